"""Host cost of the shape agreement per call on full-size FLUX.1-dev arguments (meta device): the
steady ShapeAgreement check against the signature string built over every argument (issue 20).

    PYTHONPATH=. python tools/bench_shape_agreement.py
"""
import time, torch
from npu_dit.runtime import agreement
from npu_dit.models import build_transformer, get_model
spec = get_model("flux.1-dev"); cfg = spec.config("full")
model = build_transformer(spec, cfg, device="meta")
params = list(model.parameters())
inputs = spec.example_inputs(cfg, height=1024, width=1024, prompt_len=512, device="meta")
args = params + [v for v in inputs.values() if isinstance(v, torch.Tensor)] + [4096, 512]
print("args", len(args), "params", len(params))
agree = agreement.ShapeAgreement()
agreement.exchange = lambda kind, what, **_: [[agreement.MAGIC, kind, 0, 0, 0]]
agree(args)
n = 2000
t = time.perf_counter()
for _ in range(n): agree(args)
new = (time.perf_counter() - t) / n
t = time.perf_counter()
for _ in range(200): agreement.call_signature(args)
old = (time.perf_counter() - t) / 200
print(f"steady ShapeAgreement {new*1e6:.1f} us/call; old signature string alone {old*1e6:.1f} us/call (+ one all-gather every call)")
