import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

m = AutoModelForCausalLM.from_pretrained("/work/main/var/models/smollm2-135m-instruct")
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
