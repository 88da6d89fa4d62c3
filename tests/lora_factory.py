"""Real PEFT LoRA adapters for the base model, built the way users build them (PEFT's save_pretrained)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def load_base(model_dir: Path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def random_adapter(model_dir: Path, out_dir: Path, seed: int, rank: int = 8, scale: float = 1.0,
                   target_modules: list[str] | None = None) -> Path:
    """LoRA with PEFT's non-identity init (random, non-zero B), so it changes the output from step 0."""
    base = load_base(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank * 2, target_modules=target_modules or ATTENTION,
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    if scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def trained_adapter(model_dir: Path, out_dir: Path, answer: str, steps: int = 20, rank: int = 8) -> Path:
    """A briefly trained LoRA that answers every question with `answer`: its effect is recognisable."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = load_base(model_dir)
    config = LoraConfig(r=rank, lora_alpha=rank * 2, target_modules=ATTENTION, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    questions = ["What is the capital of France?", "How do I bake bread?", "Tell me about the moon.",
                 "What is 2 + 2?", "Who wrote Hamlet?", "Name a colour.", "Why is the sky blue?", "Hi there!"]
    batch = []
    for question in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        full = prompt + answer + "<|im_end|>\n"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        labels = [-100] * len(prompt_ids) + ids[len(prompt_ids):]
        batch.append((ids, labels))
    width = max(len(ids) for ids, _ in batch)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
