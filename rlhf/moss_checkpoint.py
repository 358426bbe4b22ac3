"""One-time conversion of a moss-moon-003 checkpoint (the remote-code `MossForCausalLM`, often pickled `.bin`
shards) into this project's format: transformers' native CodeGen, safetensors weights, and a tokenizer that needs
no remote code.

MOSS is CodeGen under another name: the same parameter names, the same fused `qkv_proj` (four model-parallel shards,
each holding query, value, key in that order), the same GPT-J-style interleaved rotary on the first `rotary_dim`
dimensions, a biased `lm_head`. So converting is mostly checking: drop the causal-mask buffers, refuse what does not
fit, and write the config with MOSS's defaults (not CodeGen's) for any key the source leaves out.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
import zipfile
from typing import TYPE_CHECKING, Any, Callable

from rlhf.modeling import ModelLoadError, atomic_directory
from rlhf.moss import SPECIAL_TOKENS

if TYPE_CHECKING:
    import torch
    from transformers import CodeGenConfig, PreTrainedModel, PreTrainedTokenizerFast

# MossConfig's defaults, for keys a MOSS config.json leaves out; their names are CodeGenConfig's too.
MOSS_CONFIG_DEFAULTS: dict[str, Any] = {
    "vocab_size": 107008, "n_positions": 2048, "n_ctx": 2048, "n_embd": 4096, "n_layer": 28, "n_head": 16,
    "rotary_dim": 64, "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0,
    "attn_pdrop": 0.0, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "use_cache": True,
    "bos_token_id": 106028, "eos_token_id": 106068, "tie_word_embeddings": False,
}

# Buffers MOSS (and older CodeGen) saved with the weights: a causal mask CodeGen now builds per call.
_DROPPED_BUFFERS = (".attn.causal_mask", ".attn.masked_bias")
_GPTQ_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")

# The MOSS tokenizer's own defaults (tokenization_moss.MossTokenizer).
_MOSS_TOKENIZER_DEFAULTS = {"bos_token": "<|endoftext|>", "eos_token": "<eom>", "unk_token": "<|endoftext|>"}


def convert_moss_checkpoint(src: str, out: str) -> str:
    """Convert the MOSS checkpoint directory `src` into an HF CodeGen directory `out` (safetensors, config, tokenizer).

    Everything is read and checked before anything is written; `out` appears complete or not at all.
    """
    if not os.path.isdir(src):
        raise ModelLoadError(f"{src}: not a directory; pass a MOSS checkpoint directory (config.json and weights)")
    if os.path.realpath(src) == os.path.realpath(out):
        raise ModelLoadError(f"--out {out} is the source checkpoint itself; write the conversion to a new directory")
    config = read_moss_config(src)
    tokenizer = moss_tokenizer(src, config)  # before the weights: its checks take a moment, theirs minutes
    model = codegen_model(config, read_weights(src), src)
    if tokenizer is None:
        print(f"convert: {src} has no tokenizer (vocab.json, merges.txt); writing the model only", file=sys.stderr)
    with atomic_directory(out) as tmp:
        # transformers 5 writes safetensors only; shards keep a 16B model in files of a manageable size.
        model.save_pretrained(tmp, max_shard_size="5GB")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path}: cannot be read as JSON ({_one_line(error)})") from error


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:200] if text else type(error).__name__


def read_moss_config(src: str) -> CodeGenConfig:
    """The CodeGen config equivalent to `src/config.json`, a MOSS config."""
    from transformers import CodeGenConfig

    path = os.path.join(src, "config.json")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{src}: no config.json; a MOSS checkpoint directory has one with model_type 'moss'")
    raw = _read_json(path)
    if not isinstance(raw, dict) or (raw.get("model_type") != "moss"
                                     and "MossForCausalLM" not in (raw.get("architectures") or [])):
        found = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise ModelLoadError(f"{path}: not a MOSS checkpoint (model_type {found!r}, expected 'moss'); "
                             f"pass a moss-moon-003 directory, or load a CodeGen one directly")
    wbits = raw.get("wbits", 32)
    if wbits != 32:
        raise ModelLoadError(f"{path}: a {wbits}-bit GPTQ-quantized MOSS checkpoint (wbits={wbits}); "
                             f"convert the unquantized one (fnlp/moss-moon-003-sft) instead")
    values = {key: raw.get(key, default) for key, default in MOSS_CONFIG_DEFAULTS.items()}
    if raw.get("pad_token_id") is not None:
        values["pad_token_id"] = raw["pad_token_id"]
    try:
        config = CodeGenConfig(**values)
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"{path}: not a valid MOSS config ({_one_line(error)})") from error
    if config.n_embd % config.n_head or config.n_head % 4:
        # MOSS splits the heads over 4 model-parallel shards; other sizes cannot have come from its code.
        raise ModelLoadError(f"{path}: n_embd={config.n_embd} and n_head={config.n_head} do not fit MOSS's "
                             f"attention (n_head divisible by 4, n_embd by n_head)")
    config.architectures = ["CodeGenForCausalLM"]
    return config


def read_weights(src: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `src`: safetensors if present, else `.bin` pickles read with
    `weights_only=True`; single files or shards listed in an index."""
    names = set(os.listdir(src))
    for index_name, single_name, load in (("model.safetensors.index.json", "model.safetensors", _load_safetensors),
                                          ("pytorch_model.bin.index.json", "pytorch_model.bin", _load_pickle)):
        if index_name in names:
            return _load_sharded(os.path.join(src, index_name), load)
        if single_name in names:
            return load(os.path.join(src, single_name))
    raise ModelLoadError(f"{src}: no weights; expected pytorch_model.bin, pytorch_model.bin.index.json, "
                         f"model.safetensors or model.safetensors.index.json")


def _load_sharded(index_path: str, load: Callable[[str], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelLoadError(f"{index_path}: has no weight_map of parameter name -> shard file")
    folder = os.path.dirname(index_path)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise ModelLoadError(f"{index_path}: shard {shard} named in the index is missing; download it again")
        tensors = load(path)
        absent = [name for name, where in weight_map.items() if where == shard and name not in tensors]
        if absent:
            raise ModelLoadError(f"{path}: lacks {_some(absent)} that {os.path.basename(index_path)} places there")
        state.update(tensors)
    return state


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelLoadError(f"{path}: cannot be read as safetensors ({_one_line(error)})") from error


def _load_pickle(path: str) -> dict[str, torch.Tensor]:
    import torch
    try:
        # mmap keeps a 16B checkpoint from being copied into memory once more; only zip-format files allow it.
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(error))
        reason = f"it refers to {found.group(1)}" if found else _one_line(error)[:160]
        raise ModelLoadError(f"{path}: torch.load(weights_only=True) refuses this pickle ({reason}): it holds more "
                             f"than tensors and could run code when loaded, so it is not converted") from error
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise ModelLoadError(f"{path}: cannot be read as a PyTorch checkpoint ({_one_line(error)})") from error
    if not isinstance(loaded, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in loaded.items()):
        raise ModelLoadError(f"{path}: holds a {type(loaded).__name__}, not a dict of parameter name -> tensor")
    return loaded


def _some(names: list[str] | set[str], limit: int = 4) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def codegen_model(config: CodeGenConfig, state: dict[str, torch.Tensor], src: str) -> PreTrainedModel:
    """A `CodeGenForCausalLM` holding MOSS's tensors (not copies), after checking every name and shape."""
    import torch
    from transformers import CodeGenForCausalLM
    from transformers.models.codegen.modeling_codegen import create_sinusoidal_positions

    quantized = [name for name in state if name.endswith(_GPTQ_SUFFIXES)]
    if quantized:
        raise ModelLoadError(f"{src}: GPTQ-quantized weights ({_some(quantized, 2)}); convert the unquantized "
                             f"checkpoint (fnlp/moss-moon-003-sft) instead")
    weights = {name: tensor for name, tensor in state.items() if not name.endswith(_DROPPED_BUFFERS)}
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # MOSS ties it to wte on load, whatever the file holds
    # Built on the meta device: no memory for weights that are about to be replaced.
    with torch.device("meta"):
        model = CodeGenForCausalLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    unexpected, missing = set(weights) - set(expected), set(expected) - set(weights)
    if unexpected or missing:
        parts = ([f"unexpected {_some(unexpected)}"] if unexpected else []) + (
            [f"missing {_some(missing)}"] if missing else [])
        raise ModelLoadError(f"{src}: parameter names do not match MossForCausalLM with this config.json "
                             f"(n_layer={config.n_layer}): {'; '.join(parts)}")
    wrong = [f"{name} {list(weights[name].shape)} (expected {list(shape)})"
             for name, shape in expected.items() if tuple(weights[name].shape) != shape]
    if wrong:
        raise ModelLoadError(f"{src}: shapes do not match config.json (n_embd={config.n_embd}, "
                             f"vocab_size={config.vocab_size}): {_some(wrong, 2)}")
    model.load_state_dict(weights, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    # The rotary table is a non-persistent buffer (never saved), still on the meta device: give it its values so
    # the returned model also runs (transformers 5 keeps it in `rotary_emb`).
    rotary = getattr(model.transformer, "rotary_emb", None)
    if rotary is not None:
        rotary.embed_positions = create_sinusoidal_positions(rotary.max_positions, rotary.pos_embd_dim)
    model.eval()
    return model


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer files write it: a string, or an AddedToken dict with `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def moss_tokenizer(src: str, config: CodeGenConfig) -> PreTrainedTokenizerFast | None:
    """MOSS's byte-level BPE as a fast tokenizer that loads without remote code; None when `src` has none.

    The same vocabulary, merges, GPT-2 split pattern and added tokens give the same ids as MossTokenizer; the MOSS
    end tokens are registered as special, so they stay single tokens wherever they appear in text.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab_path, merges_path = os.path.join(src, "vocab.json"), os.path.join(src, "merges.txt")
    has_vocab, has_merges = os.path.isfile(vocab_path), os.path.isfile(merges_path)
    if not has_vocab and not has_merges:
        return None
    if not (has_vocab and has_merges):
        raise ModelLoadError(f"{src}: has {'vocab.json' if has_vocab else 'merges.txt'} but not "
                             f"{'merges.txt' if has_vocab else 'vocab.json'}; the MOSS tokenizer needs both")
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ModelLoadError(f"{vocab_path}: not a JSON object of token -> id")
    added = _added_tokens(src)
    for token, token_id in added.items():
        if vocab.get(token, token_id) != token_id:
            raise ModelLoadError(f"{src}: added token {token!r} has id {token_id}, but vocab.json gives it "
                                 f"{vocab[token]}")
    vocab = {**vocab, **added}
    if len(set(vocab.values())) != len(vocab):
        raise ModelLoadError(f"{src}: vocab.json and the added tokens give two tokens the same id")
    with open(merges_path, encoding="utf-8") as f:
        # As MossTokenizer reads it: the first line is the `#version` header, the last the empty one after "\n".
        lines = f.read().split("\n")[1:-1]
    merges = [tuple(line.split()) for line in lines]
    merges = [m for m in merges if len(m) == 2]

    tokenizer_config = _optional_json_object(os.path.join(src, "tokenizer_config.json"))
    special_map = _optional_json_object(os.path.join(src, "special_tokens_map.json"))
    roles = {role: _token_text(tokenizer_config.get(role)) or _token_text(special_map.get(role)) or default
             for role, default in _MOSS_TOKENIZER_DEFAULTS.items()}
    specials = list(dict.fromkeys([*roles.values(), *SPECIAL_TOKENS]))
    absent = [t for t in specials if t not in vocab]
    if absent:
        raise ModelLoadError(f"{src}: the tokenizer has no {' '.join(absent)} (neither in vocab.json nor in "
                             f"added_tokens.json); it is not MOSS's tokenizer")

    unk = roles["unk_token"]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk))
    # ByteLevel's split pattern is GPT-2's, which MossTokenizer uses; no prefix space, as MOSS.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # Added tokens already in the vocabulary keep their ids; in id order, as MossTokenizer lists them.
    ordinary = sorted((t for t in added if t not in specials), key=added.get)
    backend.add_tokens([AddedToken(t, normalized=False) for t in ordinary])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if tokenizer_config.get("add_bos_token"):
        # MossTokenizer then writes bos before each sequence of a pair.
        bos = roles["bos_token"]
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                               special_tokens=[(bos, vocab[bos])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **roles,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in roles.values()],
        model_max_length=tokenizer_config.get("model_max_length", config.n_positions),
        # Decoding gives back exactly the text (MOSS's slow tokenizer cleaned spaces before punctuation).
        clean_up_tokenization_spaces=False,
    )
    moved = [t for t in [*specials, *added] if tokenizer.convert_tokens_to_ids(t) != vocab[t]]
    if moved:
        raise ModelLoadError(f"{src}: tokens {' '.join(moved[:4])} would change id in conversion; report this")
    return tokenizer


def _added_tokens(src: str) -> dict[str, int]:
    """Tokens MOSS's slow tokenizer adds on top of vocab.json: added_tokens.json, and the newer
    `added_tokens_decoder` of tokenizer_config.json."""
    added: dict[str, int] = {}
    path = os.path.join(src, "added_tokens.json")
    if os.path.isfile(path):
        raw = _read_json(path)
        if not isinstance(raw, dict) or not all(isinstance(i, int) for i in raw.values()):
            raise ModelLoadError(f"{path}: not a JSON object of token -> id")
        added.update(raw)
    decoder = _optional_json_object(os.path.join(src, "tokenizer_config.json")).get("added_tokens_decoder") or {}
    for token_id, token in decoder.items():
        text = _token_text(token)
        if text is not None and str(token_id).isdigit():
            added.setdefault(text, int(token_id))
    return added


def _optional_json_object(path: str) -> dict:
    """The JSON object in `path`, or {} when there is no such file."""
    if not os.path.isfile(path):
        return {}
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: not a JSON object")
    return raw
