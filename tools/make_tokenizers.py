"""Build the tiny pipelines' tokenizers and the Qwen2.5-VL processor offline (no hub access) and
write them under npu_dit/pipelines/assets/, where the package loads them from.

    python tools/make_tokenizers.py [OUT_DIR]
"""

import sys

from npu_dit.pipelines.tokenizers import ASSETS_DIR, write_assets

if __name__ == "__main__":
    for path in write_assets(sys.argv[1] if len(sys.argv) > 1 else ASSETS_DIR):
        print(f"wrote {path}")
