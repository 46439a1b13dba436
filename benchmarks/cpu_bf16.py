"""One LoRA step of the default base in fp32 and under CPU bf16 autocast, same process, same batch.

Whether autocast pays depends on the CPU: with AVX512-BF16 or AMX it is faster, without them bf16
is emulated and far slower (the trainer then trains in fp32; docs/design-notes.md, item 1).

    python benchmarks/cpu_bf16.py     # converts the shipped base into $SHOEFIX_HOME/models once if needed
"""
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from shoefix_tasks.config import Settings
from shoefix_tasks.model.base import resolve_base
from shoefix_tasks.training.factories import cpu_bf16_native

print("native CPU bf16 (AVX512-BF16 or AMX):", cpu_bf16_native())
m = AutoModelForCausalLM.from_pretrained(resolve_base("smollm2-135m-instruct", Settings.from_env()))
m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
x = torch.randint(0, 49000, (8, 300))
for mode in ["fp32", "bf16"]:
    for i in range(3):
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(mode == "bf16")):
            loss = m(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        print(mode, i, round(time.perf_counter() - t, 2), flush=True)
