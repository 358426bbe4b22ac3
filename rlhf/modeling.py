"""Model building and loading: tiny random presets, MOSS-aware tokenizer/model loading, LoRA, atomic saves.

Every trainer loads and saves models through here, so the checks (MOSS special tokens, safetensors only) and
the on-disk layout (HF directory, PEFT adapter in `adapter/`) are the same everywhere. torch and transformers are
imported where they are used, so the command line checks model paths in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
from typing import TYPE_CHECKING, Any, Iterator

from rlhf import storage
from rlhf.files import replace_directory
from rlhf.moss import CHAT_TEMPLATE, EOH, EOM, PAD

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class ModelLoadError(Exception):
    """A model or tokenizer could not be loaded; the message is one line saying what to fix."""


# Sizes for random models, by transformers' model_type. CodeGen is moss-moon-003's architecture; Llama, Qwen2 and
# GPT-NeoX (Pythia) are the common alternatives, and the ones a reward model of which also loads as transformers'
# *ForSequenceClassification (CodeGen has none). "tiny" trains a few hundred SFT steps in about a minute on two CPU
# cores. Qwen2 is given grouped-query attention (fewer key/value heads) so that path is exercised too. "tiny32" is
# "tiny" with attention heads of 32 (the smallest vLLM's CPU backend serves; CodeGen's fused qkv wants 4 heads or a
# multiple, so its tiny32 is twice as wide); "medium" is ~30M parameters, for the generation benchmarks.
PRESETS: dict[str, dict[str, dict]] = {
    "codegen": {
        "tiny": {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 16, "n_inner": 256,
                 "n_positions": 512, "n_ctx": 512},
        "small": {"n_embd": 256, "n_layer": 4, "n_head": 8, "rotary_dim": 16, "n_inner": 1024,
                  "n_positions": 1024, "n_ctx": 1024},
        "tiny32": {"n_embd": 128, "n_layer": 2, "n_head": 4, "rotary_dim": 16, "n_inner": 256,
                   "n_positions": 512, "n_ctx": 512},
        "medium": {"n_embd": 512, "n_layer": 8, "n_head": 8, "rotary_dim": 32, "n_inner": 1536,
                   "n_positions": 1024, "n_ctx": 1024},
    },
    "llama": {
        "tiny": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512},
        "small": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                  "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 1024},
        "tiny32": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512},
        "medium": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
                   "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 1024},
    },
    "qwen2": {
        "tiny": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512},
        "small": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                  "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 1024},
    },
    "gpt_neox": {
        "tiny": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "max_position_embeddings": 512},
        "small": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                  "num_attention_heads": 8, "max_position_embeddings": 1024},
    },
}

# Attention projections are where LoRA pays off most for its size.
LORA_TARGETS: dict[str, list[str]] = {
    "codegen": ["qkv_proj", "out_proj"],
    "gpt_neox": ["query_key_value", "dense"],  # `dense` is attention's output; the MLP's are dense_h_to_4h/_4h_to_h
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

DTYPES = ("float32", "bfloat16", "float16")  # names of the torch dtypes a model may load in

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def _resolve(path_or_id: str, what: str) -> str:
    """A local directory, or a hub id; offline, a hub id must already be in the local cache.

    Resolving offline ids to their cached snapshot ourselves keeps transformers from probing the hub for
    side files (adapter configs) even when HF_HUB_OFFLINE=1 was set after it was imported.
    """
    if os.path.exists(path_or_id):
        return path_or_id
    # org/name is a hub id only when no local directory is named org: `runs/nosuch` is a mistyped path, named here
    # at once rather than sent to the hub (ten retries and a minute without a network).
    head = path_or_id.split("/", 1)[0]
    if not _HUB_ID.match(path_or_id) or path_or_id.startswith((".", "/")) or os.path.isdir(head):
        raise ModelLoadError(f"{what} path {path_or_id!r} does not exist{_nearby(path_or_id)}; pass a local model "
                             f"directory or a hub id like org/name")
    if not _offline():
        return path_or_id
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path_or_id, local_files_only=True)
    except Exception as error:  # not cached, in any of the ways huggingface_hub reports it
        raise ModelLoadError(f"{what} {path_or_id!r} is not in the local hub cache and HF_HUB_OFFLINE=1 forbids "
                             f"downloading; download it first or pass a local directory") from error


def _nearby(path: str) -> str:
    """` (its directory D has: a, b, ...)` for a path whose parent exists, the entries nearest its name first."""
    parent, name = os.path.split(path.rstrip("/"))
    if not parent or not os.path.isdir(parent):
        return ""
    entries = sorted(os.listdir(parent))
    near = difflib.get_close_matches(name, entries, n=3, cutoff=0.5)
    shown = near or entries[:5]
    return f" ({parent}/ has {', '.join(shown)}{', ...' if len(entries) > len(shown) else ''})" if shown else \
        f" ({parent}/ is empty)"


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def check_model_dir(path_or_id: str, what: str = "model") -> str:
    """Refuse, in one line and before any worker starts, a model that could not load or would load a pickle.

    Returns the local directory (or, online, the hub id). Only names are looked at: nothing is unpickled.
    """
    source = _resolve(path_or_id, what)
    if not os.path.exists(source):
        return source  # a hub id, online: transformers fetches and checks it
    if not os.path.isdir(source):
        raise ModelLoadError(f"{what} {path_or_id!r} is a file; pass the model's directory (an HF directory "
                             f"with config.json and safetensors weights)")
    names = os.listdir(source)
    if "config.json" not in names:
        raise ModelLoadError(f"{what} {path_or_id!r} has no config.json; it must be an HF model directory with "
                             f"config.json and safetensors weights (`rlhf init-model` or a run's final/)")
    if not any((n.endswith(".safetensors") and n != REWARD_HEAD_FILE) or n == "model.safetensors.index.json"
               for n in names):
        pickled = sorted(n for n in names if n.endswith(_PICKLE_SUFFIXES))
        if pickled:
            raise ModelLoadError(f"{what} {path_or_id!r} has only pickled weights ({', '.join(pickled)}), which can "
                                 f"run code when loaded; convert them to safetensors (load and save_pretrained "
                                 f"in a trusted environment) and pass that directory")
        raise ModelLoadError(f"{what} {path_or_id!r} has no safetensors weights (model.safetensors or a "
                             f"sharded index); pass a complete HF model directory")
    return source


REWARD_HEAD_FILE = "value_head.safetensors"
"""What `rlhf rm` saves the scalar head in beside the causal LM (`reward.model`)."""

PRM_FILE = "prm.json"
"""What a process reward model's final/ says about reading steps: {"step_separator", "calibration"?} (`reward.steps`)."""


def check_model_kind(source: str, what: str, kind: str) -> None:
    """Refuse, in one line, a local model directory that is not the kind of model its role needs: `causal_lm` (a
    policy, an SFT or DPO start, a model that generates), `reward` (a preference model: `rlhf rm`'s final/ with its
    head, or a sequence classifier) or `prm` (`rlhf prm`'s final/, with its prm.json). Reads config.json and looks
    for the files; a hub id (no local directory) is left to loading."""
    config = os.path.join(source, "config.json")
    if not os.path.isfile(config):
        return
    with open(config, encoding="utf-8") as f:
        architectures = json.load(f).get("architectures") or []
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    if kind == "reward" and not (classifier or os.path.isfile(os.path.join(source, REWARD_HEAD_FILE))):
        raise ModelLoadError(f"{what} {source!r} is not a reward model: config.json names "
                             f"{', '.join(architectures) or 'no architecture'} and there is no {REWARD_HEAD_FILE}; "
                             f"pass a preference model (`rlhf rm`'s final/, or a *ForSequenceClassification "
                             f"checkpoint with one label)")
    if kind == "prm" and not os.path.isfile(os.path.join(source, PRM_FILE)):
        raise ModelLoadError(f"{what} {source!r} is not a process reward model: it has no {PRM_FILE}; pass `rlhf prm`'s "
                             "final/")
    if kind == "causal_lm" and architectures and not any(a.endswith("ForCausalLM") for a in architectures):
        raise ModelLoadError(f"{what} {source!r} is not a causal LM (config.json names {', '.join(architectures)}); "
                             f"pass a model that generates (`rlhf init-model`, or `rlhf sft`'s final/)")


def _single_token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of `token` if it encodes as exactly one id inside text, else None."""
    ids = tokenizer.encode(f"a{token}b", add_special_tokens=False)
    alone = tokenizer.encode(token, add_special_tokens=False)
    if len(alone) != 1 or alone[0] not in ids:
        return None
    return alone[0]


def _saved_as_generic(directory: str) -> bool:
    """Whether a local tokenizer directory names the generic tokenizers backend, with its tokenizer.json beside."""
    config = os.path.join(directory, "tokenizer_config.json")
    if not (os.path.isfile(config) and os.path.isfile(os.path.join(directory, "tokenizer.json"))):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            return json.load(f).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")
    except (OSError, ValueError, AttributeError):
        return False  # AutoTokenizer reports what is wrong with it


def load_tokenizer(path_or_id: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer that has the MOSS end tokens as single tokens and a pad token."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # the generic backend, by its 4.x name too

    source = _resolve(path_or_id, "tokenizer")
    # AutoTokenizer swaps in its own class for some model types whatever the directory says (Qwen2 gets Qwen2Tokenizer:
    # another pre-tokenizer and an extra <|endoftext|> past the model's vocabulary); a tokenizer saved as the generic
    # backend (as `rlhf tokenizer` saves it) is loaded as exactly what its tokenizer.json holds.
    loader = PreTrainedTokenizerFast if _saved_as_generic(source) else AutoTokenizer
    try:
        tokenizer = loader.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=_offline())
    except Exception as error:  # any loader failure becomes one readable line
        raise ModelLoadError(f"could not load a tokenizer from {path_or_id!r} ({_one_line(error)}); "
                             f"check the path, or set model.trust_remote_code=true for a tokenizer with code of its "
                             f"own") from error
    missing = [t for t in (EOH, EOM) if _single_token_id(tokenizer, t) is None]
    if missing:
        raise ModelLoadError(f"tokenizer {path_or_id!r} lacks the MOSS special tokens {' '.join(missing)} as "
                             f"single tokens; retrain it with `rlhf tokenizer` or add them as special tokens")
    if tokenizer.pad_token is None:
        # Padding is masked out, so any single token works; `<pad>` keeps it distinct from the end token.
        tokenizer.pad_token = PAD if _single_token_id(tokenizer, PAD) is not None else (tokenizer.eos_token or EOM)
    if not tokenizer.chat_template:  # every model `rlhf` saves renders prompts as it was trained on them
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def quiet_loading() -> None:
    """No 'Loading weights' progress bar on stderr for each model loaded: one per rank per start in a driver's log,
    and noise around the one line a one-process command (rm-eval, prm-eval, generate) prints."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def load_causal_lm(path_or_id: str, dtype: str = "float32", trust_remote_code: bool = False) -> PreTrainedModel:
    """A causal LM from safetensors weights only: pickled checkpoints from user paths can run code."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    import torch
    from transformers import AutoModelForCausalLM

    quiet_loading()

    source = check_model_dir(path_or_id, "model")
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype), use_safetensors=True,
                                                    trust_remote_code=trust_remote_code,
                                                    local_files_only=_offline())
    except Exception as error:  # any loader failure becomes one readable line
        raise ModelLoadError(f"could not load a causal LM from {path_or_id!r} ({_one_line(error)}); it must be "
                             f"an HF directory with safetensors weights (convert .bin checkpoints first)") from error


def inference_placement(dtype: str) -> tuple[str, str]:
    """(device, dtype) of a model that only infers, in this process (`rlhf generate`'s policy and scorer): the GPU when
    there is one, and `model.dtype: auto` as bfloat16 on a GPU that has it, else float32."""
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


def build_causal_lm(path_or_id: str, dtype: str, trust_remote_code: bool,
                    construction: contextlib.AbstractContextManager) -> PreTrainedModel:
    """The causal LM of an HF directory built from its config.json inside `construction`, for a loader that fills
    in the weights itself: under `deepspeed.zero.Init`, with no random init, a ZeRO-3 rank reads only its own
    partitions (`SafetensorsIndex`)."""
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    source = local_model_dir(path_or_id)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, local_files_only=True)
        build = lambda: AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype),  # noqa: E731
                                                         trust_remote_code=trust_remote_code)
        # Once on the meta device first (no memory): the model's modules are imported outside `construction`,
        # whose patched tensor constructors torch's own imports cannot run under.
        with torch.device("meta"):
            build()
        with construction:
            model = build()
    except Exception as error:  # any failure to build from the config becomes one readable line
        raise ModelLoadError(f"could not build a causal LM from {path_or_id!r}'s config.json "
                             f"({_one_line(error)})") from error
    with contextlib.suppress(OSError):  # from_pretrained takes the directory's generation settings too
        model.generation_config = GenerationConfig.from_pretrained(source, local_files_only=True)
    return model.eval()


def local_model_dir(path_or_id: str) -> str:
    """The local directory of a model (a hub id's files are downloaded first, as from_pretrained would)."""
    source = check_model_dir(path_or_id, "model")
    if os.path.isdir(source):
        return source
    from huggingface_hub import snapshot_download
    return snapshot_download(source, allow_patterns=["*.json", "*.safetensors", "*.py", "*.txt", "*.model"])


class SafetensorsIndex:
    """Where each tensor of an HF directory's safetensors weights lies (file, dtype, shape, byte offset), read from
    the files' headers, so that a flat range of one tensor is read without reading or mapping the rest of it: how a
    ZeRO-3 rank loads only its partition of every weight."""

    DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = ["model.safetensors"]
        self.entries: dict[str, tuple[str, str, tuple[int, ...], int]] = {}
        for name in files:
            file = os.path.join(path, name)
            with open(file, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
            for key, meta in header.items():
                if key != "__metadata__":
                    self.entries[key] = (file, meta["dtype"], tuple(meta["shape"]), 8 + size + meta["data_offsets"][0])

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def numel(self, name: str) -> int:
        return math.prod(self.shape(name))

    def read(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements [start, start + count) of the flattened tensor (all of it by default), in the file's dtype."""
        import torch
        file, kind, _, offset = self.entries[name]
        dtype = getattr(torch, self.DTYPES[kind])
        count = self.numel(name) - start if count is None else count
        item = torch.empty(0, dtype=dtype).element_size()
        data = bytearray(count * item)
        with open(file, "rb") as f:
            f.seek(offset + start * item)
            if f.readinto(data) != len(data):
                raise ModelLoadError(f"{file}: {name} is cut short; the file is incomplete, download or save it again")
        return torch.frombuffer(data, dtype=dtype) if count else torch.empty(0, dtype=dtype)


def init_model(arch: str, preset: str, tokenizer_dir: str, out_dir: str, seed: int = 0) -> str:
    """Write a randomly initialised `arch` model of size `preset`, with the tokenizer, to out_dir."""
    if arch not in PRESETS:
        raise ValueError(f"--arch {arch!r} is unknown; use one of {', '.join(PRESETS)}")
    if preset not in PRESETS[arch]:
        raise ValueError(f"--preset {preset!r} is unknown for {arch}; use one of {', '.join(PRESETS[arch])}")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(tokenizer_dir)
    eos_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    bos_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos_id
    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=eos_id, bos_token_id=bos_id, **PRESETS[arch][preset])
    # Fork the RNG so a seeded init neither depends on nor disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.bos_token_id = bos_id
    save_pretrained_atomic(model, tokenizer, out_dir)
    return out_dir


def run_init_model(arch: str, preset: str, tokenizer: str, out: str, seed: int = 0) -> int:
    """`rlhf init-model`: write a random model and print a one-line summary."""
    try:
        init_model(arch, preset, tokenizer, out, seed)
    except (ModelLoadError, ValueError) as error:
        print(f"rlhf init-model: {error}", file=sys.stderr)
        return 2
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"init-model: {arch}/{preset} with {params:,} parameters, vocab {model.config.vocab_size}, "
          f"seed {seed} -> {out}")
    return 0


def apply_lora(model: PreTrainedModel, r: int, alpha: int, dropout: float,
               target_modules: list[str] | str = "auto") -> Any:
    """Wrap `model` with LoRA adapters; "auto" targets the attention projections of known architectures."""
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    if r <= 0:
        raise ValueError(f"LoRA rank r={r} must be positive; set lora.r to e.g. 8")
    targets: list[str] | str | None = target_modules
    if target_modules == "auto":
        model_type = getattr(model.config, "model_type", "")
        if model_type in LORA_TARGETS:
            targets = LORA_TARGETS[model_type]
        elif model_type in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
            targets = None  # PEFT knows this architecture
        else:
            targets = "all-linear"
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=targets)
    return get_peft_model(model, config)


def apply_lora_config(model: PreTrainedModel, lora: Any) -> Any:
    """`apply_lora` with a `LoRAConfig` section."""
    targets = lora.target_modules
    return apply_lora(model, lora.r, lora.alpha, lora.dropout, "auto" if list(targets) == ["auto"] else list(targets))


def _is_peft(model: Any) -> bool:
    """A PEFT model, told without importing peft (seconds of start-up every rank would pay for nothing)."""
    if "peft" not in sys.modules:
        return False
    from peft import PeftModel
    return isinstance(model, PeftModel)


def merged_state_dict(model: Any) -> dict[str, torch.Tensor] | None:
    """The weights of `model` (a PeftModel, or a model with LoRA layers injected) with the active LoRA deltas
    added and the LoRA keys dropped, so plain transformers loads them; None when it has no LoRA layers. The
    training model is left untouched (merge_and_unload would mutate it, and a deep copy would double memory)."""
    import torch
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if _is_peft(model) else model
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    if not layers:
        return None
    state = dict(base.state_dict())
    with torch.no_grad():
        for name, module in layers.items():
            key = f"{name}.base_layer.weight"
            if key not in state or module.merged:
                continue
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    state[key] = state[key] + module.get_delta_weight(adapter).to(state[key].dtype)
    adapters = {a for m in layers.values() for a in m.active_adapters}
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if "lora_" in key or ".original_module." in key:
            continue
        key = key.replace(".base_layer.", ".")
        for adapter in adapters:
            key = key.replace(f".modules_to_save.{adapter}.", ".")
        merged[key] = value
    return merged


@contextlib.contextmanager
def atomic_directory(out_dir: str) -> Iterator[str]:
    """A temp directory to write a model into; on success it replaces out_dir, so readers see the old directory or
    the complete new one, never half (two renames keep the window without a complete directory short); when the
    body raises, the temp directory goes and out_dir stays as it was. To an object-store URI (`rlhf.storage`) the
    directory is written locally, then uploaded in place of the old one (a run writes its final/ once, at its end)."""
    if storage.is_uri(out_dir):
        with tempfile.TemporaryDirectory(prefix="rlhf-final-") as local:
            yield local
            storage.remove(out_dir)
            storage.upload(local, out_dir)
        return
    out_dir = os.path.abspath(out_dir)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves out_dir as it was, and nothing beside it
        raise
    replace_directory(tmp, out_dir, f"{out_dir}.old-{os.getpid()}")


def write_text_files(directory: str, files: dict[str, str] | None) -> None:
    """Each name -> text of `files` as a file in `directory` (a model directory being written)."""
    for name, text in (files or {}).items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            f.write(text)


def save_pretrained_atomic(model: Any, tokenizer: PreTrainedTokenizerBase | None, out_dir: str,
                           merge_lora: bool = True, extra_files: dict[str, str] | None = None) -> str:
    """Save an HF directory atomically (`atomic_directory`).

    A PEFT model is saved as its adapter in `out_dir/adapter/` and, with merge_lora, as the merged full
    model at the top level so plain transformers can load it.
    """
    with atomic_directory(out_dir) as tmp:
        if _is_peft(model):
            adapter_dir = os.path.join(tmp, "adapter")
            model.save_pretrained(adapter_dir, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(adapter_dir)
            if merge_lora:
                model.get_base_model().save_pretrained(tmp, state_dict=merged_state_dict(model))
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_text_files(tmp, extra_files)
    return out_dir if storage.is_uri(out_dir) else os.path.abspath(out_dir)
