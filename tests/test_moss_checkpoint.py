"""Converting a moss-moon-003 checkpoint: a tiny random model in MOSS's names and layout, saved the ways MOSS
checkpoints come (pickled `.bin` shards with an index, safetensors), converted, loaded as plain transformers
CodeGen, and compared with MOSS's forward written out below from its modeling code."""
from __future__ import annotations

import argparse
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from rlhf.modeling import ModelLoadError, load_causal_lm, load_tokenizer
from rlhf.moss_checkpoint import convert_moss_checkpoint

# A MOSS config.json as MossConfig writes it, at a tiny size; rotary_dim < head_dim so some dims pass unrotated.
MOSS_CONFIG = {
    "architectures": ["MossForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_moss.MossConfig", "AutoModel": "modeling_moss.MossModel",
                 "AutoModelForCausalLM": "modeling_moss.MossForCausalLM"},
    "model_type": "moss", "torch_dtype": "float32", "transformers_version": "4.25.1",
    "vocab_size": 288, "n_positions": 64, "n_ctx": 64, "n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4,
    "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "use_cache": True,
    "bos_token_id": 259, "eos_token_id": 264, "tie_word_embeddings": False, "wbits": 32, "groupsize": 128,
}


def moss_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under MossForCausalLM's state-dict names, with its saved causal-mask buffers."""
    g = torch.Generator().manual_seed(seed)
    E, V, P = config["n_embd"], config["vocab_size"], config["n_positions"]
    inner = config["n_inner"] or 4 * E

    def rand(*shape, mean=0.0):
        return mean + 0.3 * torch.randn(*shape, generator=g)

    state = {"transformer.wte.weight": rand(V, E)}
    for i in range(config["n_layer"]):
        layer = f"transformer.h.{i}."
        state.update({
            layer + "ln_1.weight": rand(E, mean=1.0), layer + "ln_1.bias": rand(E),
            layer + "attn.causal_mask": torch.ones(P, P, dtype=torch.bool).tril().view(1, 1, P, P),
            layer + "attn.qkv_proj.weight": rand(3 * E, E), layer + "attn.out_proj.weight": rand(E, E),
            layer + "mlp.fc_in.weight": rand(inner, E), layer + "mlp.fc_in.bias": rand(inner),
            layer + "mlp.fc_out.weight": rand(E, inner), layer + "mlp.fc_out.bias": rand(E),
        })
    state.update({"transformer.ln_f.weight": rand(E, mean=1.0), "transformer.ln_f.bias": rand(E),
                  "lm_head.weight": rand(V, E), "lm_head.bias": rand(V)})
    if config["tie_word_embeddings"]:
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def moss_logits(w: dict[str, torch.Tensor], config: dict, ids: torch.Tensor) -> torch.Tensor:
    """MOSS's forward (OpenLMLab/MOSS models/modeling_moss.py), from its math: the test's independent reference."""
    E, H, R, eps = config["n_embd"], config["n_head"], config["rotary_dim"], config["layer_norm_epsilon"]
    D = E // H
    B, T = ids.shape
    inv_freq = 1.0 / 10000 ** (torch.arange(0, R, 2).float() / R)
    angles = torch.arange(T).float()[:, None] * inv_freq  # [T, R/2]; position ids 0..T-1
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]  # broadcast over heads
    causal = torch.ones(T, T, dtype=torch.bool).tril()

    def rotate(t: torch.Tensor) -> torch.Tensor:
        """[B, T, H, D]: MOSS (GPT-J style) rotates neighbouring pairs (0,1), (2,3), ... of the first R dims."""
        pairs = t[..., :R].unflatten(-1, (R // 2, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
        return torch.cat((rotated, t[..., R:]), dim=-1)

    x = w["transformer.wte.weight"][ids]  # [B, T, E]
    for i in range(config["n_layer"]):
        def p(name: str) -> torch.Tensor:
            return w[f"transformer.h.{i}.{name}"]
        h = F.layer_norm(x, (E,), p("ln_1.weight"), p("ln_1.bias"), eps)
        # mp_num = 4: the 3E outputs are 4 shards, each [query | value | key] for H/4 heads (E/4 dims apiece).
        shards = (h @ p("attn.qkv_proj.weight").T).unflatten(-1, (4, 3, E // 4))  # [B, T, shard, q/v/k, E/4]
        q, v, k = (shards[:, :, :, j].reshape(B, T, H, D) for j in range(3))
        q, k = rotate(q), rotate(k)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        attn = torch.einsum("bhqk,bkhd->bqhd", weights, v).reshape(B, T, E) @ p("attn.out_proj.weight").T
        mlp = gelu_new(h @ p("mlp.fc_in.weight").T + p("mlp.fc_in.bias")) @ p("mlp.fc_out.weight").T \
            + p("mlp.fc_out.bias")
        x = x + attn + mlp  # attention and MLP both read ln_1's output and add to the residual
    x = F.layer_norm(x, (E,), w["transformer.ln_f.weight"], w["transformer.ln_f.bias"], eps)
    head = w["transformer.wte.weight"] if config["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T + w["lm_head.bias"]


def write_config(src, config: dict) -> None:
    src.mkdir(parents=True, exist_ok=True)
    (src / "config.json").write_text(json.dumps(config))


def write_sharded(src, state: dict[str, torch.Tensor], shards: int, kind: str) -> None:
    """`state` split over `shards` files with an index, as save_pretrained wrote MOSS's (`bin`) or would today."""
    names = sorted(state)
    suffix, index_name = {"bin": ("bin", "pytorch_model.bin.index.json"),
                          "safetensors": ("safetensors", "model.safetensors.index.json")}[kind]
    prefix = "pytorch_model" if kind == "bin" else "model"
    weight_map = {}
    for n in range(shards):
        file = f"{prefix}-{n + 1:05d}-of-{shards:05d}.{suffix}"
        part = {name: state[name].clone() for name in names[n::shards]}
        if kind == "bin":
            torch.save(part, src / file)
        else:
            from safetensors.torch import save_file
            save_file(part, str(src / file))
        weight_map.update(dict.fromkeys(part, file))
    (src / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def byte_chars() -> list[str]:
    from tokenizers import pre_tokenizers
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def write_moss_tokenizer(src) -> dict[str, int]:
    """MOSS's tokenizer files at a tiny size: GPT-2 byte-level BPE, the end tokens as added tokens, and a
    tokenizer_config that points at remote code. Returns the vocabulary with the added tokens."""
    vocab = {c: i for i, c in enumerate(byte_chars())}
    for token in ("hi", "Ġh", "Ġhi", "<|endoftext|>"):
        vocab[token] = len(vocab)
    added = {t: len(vocab) + i for i, t in enumerate(["<eoh>", "<eot>", "<eoc>", "<eor>", "<eom>", "<|extra|>"])}
    (src / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (src / "merges.txt").write_text("#version: 0.2\nĠ h\nĠh i\nh i\n", encoding="utf-8")
    (src / "added_tokens.json").write_text(json.dumps(added))
    (src / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<eom>",
                                                             "unk_token": "<|endoftext|>"}))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_prefix_space": False, "bos_token": "<|endoftext|>", "eos_token": "<eom>",
        "unk_token": "<|endoftext|>", "model_max_length": 2048, "tokenizer_class": "MossTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_moss.MossTokenizer", None]}}))
    (src / "tokenization_moss.py").write_text("raise RuntimeError('remote code must not run')\n")
    return {**vocab, **added}


def assert_same_logits(out, state: dict, config: dict) -> None:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(out))  # no trust_remote_code
    assert type(model).__name__ == "CodeGenForCausalLM"
    ids = torch.randint(0, config["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    torch.testing.assert_close(logits, moss_logits(state, config, ids), atol=2e-5, rtol=1e-4)


def test_pickled_shards_convert_to_codegen_with_the_same_logits_and_tokenizer(tmp_path):
    src, out = tmp_path / "moss-moon-003-sft", tmp_path / "converted"
    write_config(src, MOSS_CONFIG)
    state = moss_state_dict(MOSS_CONFIG)
    write_sharded(src, state, shards=3, kind="bin")
    vocab = write_moss_tokenizer(src)

    assert convert_moss_checkpoint(str(src), str(out)) == str(out)

    files = sorted(os.listdir(out))
    assert "model.safetensors" in files and not [f for f in files if f.endswith((".bin", ".py"))]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "codegen" and "auto_map" not in config and "wbits" not in config
    assert (config["rotary_dim"], config["n_positions"], config["eos_token_id"]) == (4, 64, 264)
    assert_same_logits(out, state, MOSS_CONFIG)
    load_causal_lm(str(out))  # the project's own loader, which refuses pickles, takes it

    tokenizer = load_tokenizer(str(out))  # checks the MOSS end tokens are single tokens
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    text = "hi<eoh>\n hi<|extra|><eom>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids == [vocab["hi"], vocab["<eoh>"], vocab["Ċ"], vocab["Ġhi"], vocab["<|extra|>"], vocab["<eom>"]]
    assert tokenizer.decode(ids) == text
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<eot>", "<eoc>", "<eor>")] == \
        [vocab["<eot>"], vocab["<eoc>"], vocab["<eor>"]]
    assert tokenizer.eos_token == "<eom>"


def test_sharded_safetensors_without_tokenizer_write_the_model_only(tmp_path, capsys):
    src, out = tmp_path / "moss", tmp_path / "converted"
    write_config(src, MOSS_CONFIG)
    state = moss_state_dict(MOSS_CONFIG, seed=2)
    # Older CodeGen-derived checkpoints also carry this buffer; it is dropped like causal_mask.
    state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e9)
    write_sharded(src, state, shards=2, kind="safetensors")

    convert_moss_checkpoint(str(src), str(out))

    assert "has no tokenizer" in capsys.readouterr().err
    assert not [f for f in os.listdir(out) if f.startswith("tokenizer")]
    assert_same_logits(out, state, MOSS_CONFIG)


def test_tied_embeddings_in_a_single_file(tmp_path):
    config = {**MOSS_CONFIG, "tie_word_embeddings": True}
    src, out = tmp_path / "moss", tmp_path / "converted"
    write_config(src, config)
    state = moss_state_dict(config, seed=3)
    torch.save(state, src / "pytorch_model.bin")

    convert_moss_checkpoint(str(src), str(out))

    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert_same_logits(out, state, config)


def _rename_a_parameter(src):
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    state["transformer.h.1.mlp.c_fc.weight"] = state.pop("transformer.h.1.mlp.fc_in.weight")
    torch.save(state, src / "pytorch_model.bin")


def _drop_a_shard_named_in_the_index(src):
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    os.remove(src / "pytorch_model.bin")
    write_sharded(src, state, shards=2, kind="bin")
    os.remove(src / "pytorch_model-00002-of-00002.bin")


def _pickle_an_object(src):
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "args": argparse.Namespace(lr=1e-5)}, src / "pytorch_model.bin")


def _tokenizer_without_eoh(src):
    write_moss_tokenizer(src)
    added = json.loads((src / "added_tokens.json").read_text())
    del added["<eoh>"]
    (src / "added_tokens.json").write_text(json.dumps(added))


def _write_config(**changes):
    def change(src):
        write_config(src, {**json.loads((src / "config.json").read_text()), **changes})
    return change


@pytest.mark.parametrize("break_it, message", [
    (_write_config(model_type="llama", architectures=["LlamaForCausalLM"]),
     "config.json: not a MOSS checkpoint (model_type 'llama'"),
    (lambda src: os.remove(src / "config.json"), "no config.json"),
    (_write_config(wbits=4), "4-bit GPTQ-quantized"),
    (lambda src: os.remove(src / "pytorch_model.bin"), "no weights; expected pytorch_model.bin"),
    (_drop_a_shard_named_in_the_index, "shard pytorch_model-00002-of-00002.bin named in the index is missing"),
    (_rename_a_parameter, "unexpected transformer.h.1.mlp.c_fc.weight; missing transformer.h.1.mlp.fc_in.weight"),
    (_write_config(n_layer=3), "missing transformer.h.2."),
    (_write_config(n_embd=48, n_inner=128), "shapes do not match config.json (n_embd=48"),
    (_pickle_an_object, "refuses this pickle (it refers to argparse.Namespace)"),
    (_tokenizer_without_eoh, "the tokenizer has no <eoh> (neither in vocab.json nor in added_tokens.json)"),
])
def test_bad_checkpoints_are_refused_in_one_line(tmp_path, break_it, message):
    src, out = tmp_path / "moss", tmp_path / "converted"
    write_config(src, MOSS_CONFIG)
    torch.save(moss_state_dict(MOSS_CONFIG), src / "pytorch_model.bin")
    break_it(src)

    with pytest.raises(ModelLoadError) as error:
        convert_moss_checkpoint(str(src), str(out))

    assert message in str(error.value) and "\n" not in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["moss"]  # nothing written, not even a temp directory


def test_converting_into_the_source_directory_is_refused(tmp_path):
    write_config(tmp_path, MOSS_CONFIG)
    with pytest.raises(ModelLoadError, match="is the source checkpoint itself"):
        convert_moss_checkpoint(str(tmp_path), str(tmp_path))


def test_add_bos_token_is_kept(tmp_path):
    from rlhf.moss_checkpoint import moss_tokenizer, read_moss_config
    write_config(tmp_path, MOSS_CONFIG)
    vocab = write_moss_tokenizer(tmp_path)
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**settings, "add_bos_token": True}))

    tokenizer = moss_tokenizer(str(tmp_path), read_moss_config(str(tmp_path)))

    assert tokenizer.encode("hi") == [vocab["<|endoftext|>"], vocab["hi"]]
