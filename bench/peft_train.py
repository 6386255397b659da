#!/usr/bin/env python3
"""Peer benchmark for `hone bench --train`: the same LoRA training step in PyTorch + PEFT.

LoRA r=8, alpha=16 on q,k,v,o,gate,up,down of every layer of the default model, batches of
4 x 128 tokens, AdamW, on the token ids that `hone bench --train --data-out FILE` wrote (the same
data hone trains on). The model is the same GGUF file, dequantised to fp32 by transformers'
GGUF loader (PEFT needs a float base model). Prints one JSON line with train_tps and peak_rss_mb.

Needs the user's own installs (nothing is vendored): pip install torch transformers peft gguf
Usage: python3 bench/peft_train.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf --data FILE \
           [--threads 2] [--steps 5]
"""
import argparse
import json
import os
import resource
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", required=True, help="JSON written by hone bench --train --data-out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    d, f = os.path.split(os.path.abspath(a.gguf))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = json.load(open(a.data))
    seqs = data["sequences"]  # each has tokens (128) and targets (128)
    b = 4

    def step(i):
        batch = seqs[i * b:(i + 1) * b]
        ids = torch.tensor([s["tokens"] for s in batch])
        tgt = torch.tensor([s["targets"] for s in batch])
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    losses = [step(0)]  # warm-up, untimed
    t = time.perf_counter()
    for i in range(1, a.steps + 1):
        losses.append(step(i))
    secs = time.perf_counter() - t
    tps = a.steps * b * 128 / secs
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({
        "peer": "pytorch+peft", "torch": torch.__version__, "threads": a.threads,
        "train_tps": tps, "peak_rss_mb": peak, "steps": a.steps, "seconds_per_step": secs / a.steps,
        "losses": losses,
    }))


if __name__ == "__main__":
    main()
