"""Tokenizers and the Qwen2.5-VL processor for the tiny offline pipelines, built without any hub.

The real checkpoints ship a CLIP BPE tokenizer and a T5 SentencePiece (Unigram) tokenizer for FLUX,
and a Qwen2 byte-level BPE tokenizer plus the Qwen2.5-VL processor (image processor + tokenizer + chat
template) for Qwen-Image. Here the same transformers classes are built from small vocabularies:

- CLIP: the 256 byte-level symbols and their `</w>` forms, BPE merges trained on a small fixed
  corpus (the `tokenizers` trainer), CLIP's `<|startoftext|>` / `<|endoftext|>`.
- T5: a Unigram vocabulary of single characters (ASCII letters, digits, punctuation) and `▁`-prefixed characters, `<pad>`, `</s>`, `<unk>`
  and the 100 `<extra_id_N>` sentinels T5 always has.
- Qwen2: the 256 byte-level symbols, merges trained on the same corpus plus the Qwen-Image prompt
  templates, and Qwen's special tokens (`<|im_start|>`, `<|vision_start|>`, `<|image_pad|>`, ...), so
  the edit pipelines' text encoder sees the input image through `<|image_pad|>` tokens.
- Qwen2.5-VL processor: `Qwen2VLImageProcessor` with a small `max_pixels` (a few vision patches per
  image), the Qwen2 tokenizer above.

`tools/make_tokenizers.py` writes them under `npu_dit/pipelines/assets/` (shipped with the package);
`npu_dit.pipelines.tiny` loads them from there with the ordinary `from_pretrained(local_dir)`.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

ASSETS_DIR = Path(__file__).parent / "assets"
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# a fixed corpus: common English, the words of the Qwen-Image prompt templates, digits and punctuation
CORPUS = (
    "a photo of a cat sitting on a red chair in the sun. a dog running on the beach at sunset. "
    "an astronaut riding a horse on the moon, high quality, detailed, 4k. a bowl of fruit on a wooden table. "
    "make the sky blue and add a rainbow. replace the text with a new sign. change the color of the dress. "
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships "
    "of the objects and background. Describe the key features of the input image (color, shape, size, texture, "
    "objects, background), then explain how the user's text instruction should alter or modify the image. "
    "Generate a new image that meets the user's requirements while maintaining consistency with the original "
    "input where appropriate. system user assistant Picture 1: Picture 2: Picture 3: 0123456789 bad quality, "
    "blurry, low resolution, ugly. "
)


def _byte_level_bpe(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a byte-level BPE trained on CORPUS."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS] * 3, trainer=trainer)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(tok.to_str())["model"]["merges"]]
    return dict(tok.get_vocab()), merges


def build_clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = _byte_level_bpe(400)
    # CLIP marks the end of a word with "</w>": every symbol gets its word-final form
    clip_vocab = {}
    for token in list(vocab):
        clip_vocab.setdefault(token, len(clip_vocab))
    for token in list(vocab):
        clip_vocab.setdefault(token + "</w>", len(clip_vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        clip_vocab[special] = len(clip_vocab)
    return CLIPTokenizer(vocab=clip_vocab, merges=merges, model_max_length=77)


def build_t5_tokenizer():
    from transformers import T5Tokenizer

    chars = sorted((set(CORPUS) | set(string.ascii_letters + string.digits + string.punctuation)) - {" "})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in chars] + [("▁" + c, -2.5) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=100, model_max_length=512)


def build_qwen2_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab, merges = _byte_level_bpe(600)
    vocab["<|endoftext|>"] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=2048)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    return tok


def build_qwen_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor

    # at most 16 merged vision tokens (64 patches of 14 px) per image: the text encoder sees every
    # input image, cheaply
    image_processor = Qwen2VLImageProcessor(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    return assemble_qwen_processor(image_processor, tokenizer)


def assemble_qwen_processor(image_processor, tokenizer):
    """Qwen2_5_VLProcessor(image_processor, tokenizer), also where torchvision is missing.

    transformers 5.x type-checks the video processor slot against a class that needs torchvision, even
    when it is None; the diffusers pipelines only pass images, so without torchvision the processor
    is built with that one check skipped.
    """
    from unittest import mock

    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    try:
        return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
    except (AttributeError, ImportError, TypeError):
        with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
            return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_qwen_processor(path: str):
    """The processor saved by `write_assets` (or a checkpoint's `processor/` folder)."""
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor

    try:
        return Qwen2_5_VLProcessor.from_pretrained(path)
    except (AttributeError, ImportError, TypeError, ValueError, OSError):
        return assemble_qwen_processor(AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path))


def write_assets(out_dir: str | os.PathLike = ASSETS_DIR) -> list[Path]:
    """Build every tokenizer / processor and save it under out_dir; returns the written folders."""
    out = Path(out_dir)
    written = []
    qwen2 = build_qwen2_tokenizer()
    for name, obj in (
        ("clip_tokenizer", build_clip_tokenizer()),
        ("t5_tokenizer", build_t5_tokenizer()),
        ("qwen2_tokenizer", qwen2),
        ("qwen2_5_vl_processor", build_qwen_processor(qwen2)),
    ):
        path = out / name
        path.mkdir(parents=True, exist_ok=True)
        if name == "qwen2_5_vl_processor":  # its parts: saving the whole needs the video processor
            obj.image_processor.save_pretrained(path)
            obj.tokenizer.save_pretrained(path)
        else:
            obj.save_pretrained(path)
        written.append(path)
    return written


def asset(name: str) -> str:
    path = ASSETS_DIR / name
    if not path.is_dir():
        raise RuntimeError(
            f"the offline tokenizer files {path} are missing; build them with "
            f"`python tools/make_tokenizers.py` (no network needed)"
        )
    return str(path)
