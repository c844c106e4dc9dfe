"""Turning the fused paths on for a PEFT LoRA model, off again, and computing its training loss.

    model = accelerate_model(get_peft_model(base, lora_config))   # swaps modules in place
    loss = causal_lm_loss(model, batch)      # fused linear cross-entropy when enabled
    model.save_pretrained(out)               # same adapter files as without acceleration
    accelerated(model).set_micro_batch(seed, k)   # seeded dropout: the masks of micro-batch k next
    restore_model(model)                     # the original modules back (e.g. before generation)

Nothing is patched at import time and no library code changes: `accelerate_model` replaces module
instances inside this one model, and each replacement falls back to the original forward where it
cannot match it. Unsupported architectures are left as they are. What the fused modules share (settings,
dropout seed, adapter cache, the pre-forward hook) is owned by the model's `Accelerated` handle, kept in
a weak registry here: no attribute is hung on the transformers modules.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any, Mapping

import torch
from torch import nn

from .cross_entropy import fused_causal_lm_loss
from .dropout import DropoutSeed
from .fp8 import Fp8Weights
from .lora import AdapterCache
from .modules import FusedAttention, FusedMLP, FusedRMSNorm, lora_proj
from .rmsnorm import add_rms_norm

__all__ = ["Accelerated", "Acceleration", "accelerate_model", "accelerated", "causal_lm_loss", "decoder_forward",
           "fused_layer_body", "restore_model"]

ATTENTION = ("LlamaAttention", "Qwen2Attention", "Qwen3Attention", "MistralAttention")
MLP = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")
NORM = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
LAYER = ("LlamaDecoderLayer", "Qwen2DecoderLayer", "Qwen3DecoderLayer", "MistralDecoderLayer")
# The causal LMs whose logits are exactly lm_head(final hidden state): the fused cross-entropy computes that.
# Others may transform them (Gemma2's soft-capping, Granite's and Cohere's logit scales) or lack the decoder
# layout the fused modules assume (GPT-2, GPT-NeoX, Falcon): they are left as they are.
CAUSAL_LM = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
CE_CHUNK_ELEMENTS = 1 << 27  # logits in one cross-entropy chunk by default: 256 MiB in bf16
_FUSED = (FusedAttention, FusedMLP, FusedRMSNorm)


@dataclass(frozen=True)
class Acceleration:
    """Which fused paths a model runs: `accelerated(model).acceleration`."""

    fused_lora: bool = True
    fused_norm: bool = True
    fused_rope: bool = True
    fused_swiglu: bool = True
    fused_ce: bool = True
    varlen_attention: bool = True
    shared_dropout: bool = True
    ce_chunk: int | None = None
    seeded_dropout: bool = False
    swapped: int = 0
    fused_residual: bool = False
    sdpa_backend: str | None = None
    checkpointed_ce_chunk: int | None = None
    adapter_cache: bool = False
    fp8_base: bool = False

    def ce_rows(self, vocab: int, checkpointed: bool) -> int:
        """Rows of logits per cross-entropy chunk: ce_chunk, else checkpointed_ce_chunk under
        activation checkpointing, else about 256 MiB of bf16 logits (1,046 rows at 128,256 tokens)."""
        if self.ce_chunk is not None:
            return int(self.ce_chunk)
        if checkpointed and self.checkpointed_ce_chunk is not None:
            return int(self.checkpointed_ce_chunk)
        return max(64, CE_CHUNK_ELEMENTS // vocab)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The *ForCausalLM inside a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _layers(causal: nn.Module) -> list[nn.Module]:
    decoder = getattr(causal, "model", None)
    return list(getattr(decoder, "layers", [])) if decoder is not None else []


# Each accelerated *ForCausalLM's handle, for the kernels' own lookups (`causal_lm_loss`, `decoder_forward`).
# Nothing is stored on the transformers modules; the keys are weak, so a model its caller drops is freed
# with its entry (the handle holds the model only weakly, or its entry would keep it alive).
_HANDLES: weakref.WeakKeyDictionary[nn.Module, Accelerated] = weakref.WeakKeyDictionary()
_MICRO_BATCH_STRIDE = 1_000_003  # micro-batch k of a run seeded s draws from s * 1_000_003 + k, as the trainer's RNG


class Accelerated:
    """The handle of one accelerated model: its settings and the state its fused modules share.

        model = accelerate_model(peft_model, seeded_dropout=True)
        handle = accelerated(model)
        handle.set_micro_batch(seed, k)    # the next forward draws micro-batch k's dropout masks
        handle.restore()                   # the original modules back, as restore_model(model)

    It owns the dropout seed (`DropoutSeed`, a device counter the fused LoRA products read), the adapter
    cache (`AdapterCache`), the FP8 copies of the frozen weights (`fp8_weights`, with fp8_base) and the
    pre-forward hook on the decoder that advances the seed and refreshes the cache once per forward (a
    captured CUDA graph replays the hook's work too: new masks every replay).
    """

    def __init__(self, model: nn.Module, causal: nn.Module, acceleration: Acceleration,
                 dropout_seed: DropoutSeed | None, adapter_cache: AdapterCache | None,
                 fp8_weights: Fp8Weights | None = None) -> None:
        self._model, self._causal = weakref.ref(model), weakref.ref(causal)
        self.acceleration = acceleration
        self.dropout_seed = dropout_seed
        self.adapter_cache = adapter_cache
        self.fp8_weights = fp8_weights
        self._hook = None
        if dropout_seed is not None or adapter_cache is not None:
            self._hook = causal.model.register_forward_pre_hook(lambda *_: self.before_forward())

    @property
    def model(self) -> nn.Module | None:
        """The model `accelerate_model` was given (None once its caller has dropped it)."""
        return self._model()

    def set_micro_batch(self, seed: int, k: int) -> None:
        """Make the next forward draw the dropout masks of micro-batch k of a run seeded `seed`: a pure
        function of (seed, k), whatever ran before (a resumed run, another process, a warm-up).
        A no-op without seeded dropout, where PEFT's dropout draws from torch's RNG."""
        if self.dropout_seed is not None:
            # the pre-forward hook advances the counter once before the layers draw: start one below
            self.dropout_seed.value.fill_(seed * _MICRO_BATCH_STRIDE + k - 1)

    def before_forward(self) -> None:
        """Per decoder forward: the next dropout seed, and the adapters cast again (they may have stepped)."""
        if self.dropout_seed is not None:
            self.dropout_seed.advance()
        if self.adapter_cache is not None:
            self.adapter_cache.refresh()

    def restore(self) -> nn.Module | None:
        """Put the original modules back (`restore_model`); the handle is spent. Returns the model."""
        causal = self._causal()
        if causal is not None:
            restore_model(causal)
        return self.model

    def _detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def accelerated(model: nn.Module) -> Accelerated | None:
    """The handle of a model `accelerate_model` swapped (PeftModel or *ForCausalLM); None if it is not."""
    return _HANDLES.get(_causal_lm(model))


def accelerate_model(model: nn.Module, *, fused_lora: bool = True, fused_norm: bool = True, fused_rope: bool = True,
                     fused_swiglu: bool = True, fused_ce: bool = True, varlen_attention: bool = True,
                     shared_dropout: bool = True, ce_chunk: int | None = None,
                     seeded_dropout: bool = False, fused_residual: bool = False, sdpa_backend: str | None = None,
                     checkpointed_ce_chunk: int | None = 256, adapter_cache: bool = True,
                     max_positions: int | None = None, fp8_base: bool = False,
                     fp8_offload: bool = False) -> nn.Module:
    """Swap the decoder's attention, MLP and norms of `model` (PeftModel or *ForCausalLM) for fused ones.

    fused_lora: one pass over each shared input for its LoRA projections, in the model dtype.
    fused_norm / fused_rope / fused_swiglu: Triton kernels (torch reference on CPU).
    fused_ce: `causal_lm_loss` computes the loss chunk by chunk without full logits.
    varlen_attention: packed batches (`pack_batch`) attend per example through flash varlen.
    shared_dropout: the projections of one input share one LoRA dropout mask (False: PEFT's
        independent masks, one group per projection).
    seeded_dropout: draw LoRA dropout masks from a step counter instead of the RNG state
        (`lorafit.kernels.dropout`), so activation checkpointing can run with
        preserve_rng_state=False inside a captured CUDA graph; GPU only, saves no masks.
        `accelerated(model).set_micro_batch(seed, k)` picks the masks of the next forward.
    ce_chunk: rows of logits per cross-entropy chunk (None: about 256 MiB of bf16 logits, 1,046 rows
        for a 128,256-token vocabulary). checkpointed_ce_chunk: the rows per chunk instead while the
        decoder layers are activation-checkpointed and ce_chunk is None (None: the same default). The
        chunk's logits are live at the end of the forward, where a checkpointed step peaks: 256 rows
        hold 63 MiB at 128,256 tokens instead of 256 MiB.
    fused_residual: the post-attention `h = residual + attn; norm(h)` as one kernel (`add_rms_norm`),
        through lorafit's own decoder-layer body in `decoder_forward` (unpadded and packed batches).
    adapter_cache: cast the float32 adapters to the model dtype once per forward, for all layers in a few
        multi-tensor kernels (`AdapterCache`), instead of inside every group call. Not for FSDP-sharded
        adapters (lorafit refuses fused kernels under FSDP).
    sdpa_backend: pin the SDPA kernel of unpacked, unmasked batches ("cudnn", "flash", "efficient",
        "math"; None: PyTorch's choice, through Hugging Face's attention function).
    max_positions: the longest span one token can attend over in this use (the trainer: max_length). An
        attention layer with a sliding window shorter than that (or any window, when unknown) is left as it
        is: the fused attention does not apply windows.
    fp8_base: the fused LoRA products run their frozen GEMMs in FP8 (e4m3, row-wise scales) from copies of
        the frozen weights made here (`lorafit.kernels.fp8`; they hold as many bytes as the bf16 weights,
        which are kept for generation and merging). A different computation from the model dtype's.
    fp8_offload: with fp8_base, the copied bf16 weights wait in host memory while the model is
        accelerated (the copies then cost no GPU memory); `restore_model` moves them back.
    Only the causal LMs in CAUSAL_LM are accelerated; any other model is left as it is (`swapped` 0, no
    fused cross-entropy). Calling it again re-applies from the original modules with the new flags.
    Returns `model`, swapped in place; `accelerated(model)` is its handle.
    """
    restore_model(model)
    causal = _causal_lm(model)
    if type(causal).__name__ not in CAUSAL_LM:
        _HANDLES[causal] = Accelerated(model, causal, Acceleration(fused_ce=False, swapped=0), None, None)
        return model
    seed = DropoutSeed(next(causal.parameters()).device) if seeded_dropout else None
    cache = AdapterCache() if adapter_cache else None
    fp8 = Fp8Weights(offload=fp8_offload) if fp8_base and fused_lora else None  # FP8 runs in the fused products
    swapped = 0
    for index, layer in enumerate(_layers(causal)):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        # Qwen2's attention holds its layer's window (None where the layer has none); Mistral's reads its config
        window = attn.sliding_window if hasattr(attn, "sliding_window") else \
            getattr(getattr(attn, "config", None), "sliding_window", None)
        windowed = window is not None and (max_positions is None or window < max_positions)
        if type(attn).__name__ in ATTENTION and hasattr(attn, "head_dim") and not windowed:
            layer.self_attn = FusedAttention(attn, fused_lora=fused_lora, fused_rope=fused_rope,
                                             varlen=varlen_attention, shared_dropout=shared_dropout,
                                             sdpa_backend=sdpa_backend)
            layer.self_attn.dropout_seed, layer.self_attn.dropout_site = seed, index
            layer.self_attn.adapter_cache, layer.self_attn.fp8_weights = cache, fp8
            swapped += 1
        act = getattr(getattr(mlp, "config", None), "hidden_act", None)
        if type(mlp).__name__ in MLP and act in ("silu", "swish"):
            layer.mlp = FusedMLP(mlp, fused_lora=fused_lora, fused_swiglu=fused_swiglu, shared_dropout=shared_dropout)
            layer.mlp.dropout_seed, layer.mlp.dropout_site = seed, index
            layer.mlp.adapter_cache, layer.mlp.fp8_weights = cache, fp8
            swapped += 1
        for name in ("input_layernorm", "post_attention_layernorm"):
            norm = getattr(layer, name, None)
            if fused_norm and type(norm).__name__ in NORM:
                setattr(layer, name, FusedRMSNorm(norm))
                swapped += 1
    decoder = getattr(causal, "model", None)
    if fused_norm and type(getattr(decoder, "norm", None)).__name__ in NORM:
        decoder.norm = FusedRMSNorm(decoder.norm)
        swapped += 1
    acceleration = Acceleration(
        fused_lora=fused_lora, fused_norm=fused_norm, fused_rope=fused_rope, fused_swiglu=fused_swiglu,
        fused_ce=fused_ce, varlen_attention=varlen_attention, shared_dropout=shared_dropout, ce_chunk=ce_chunk,
        seeded_dropout=seeded_dropout, swapped=swapped, fused_residual=fused_residual, sdpa_backend=sdpa_backend,
        checkpointed_ce_chunk=checkpointed_ce_chunk, adapter_cache=adapter_cache, fp8_base=fp8 is not None)
    if fp8 is not None:  # the copies now, once: never inside a captured step
        _prepare_fp8(causal, fp8)
    _HANDLES[causal] = Accelerated(model, causal, acceleration, seed, cache, fp8)
    return model


def _prepare_fp8(causal: nn.Module, fp8: Fp8Weights) -> None:
    for layer in _layers(causal):
        for block in (getattr(layer, "self_attn", None), getattr(layer, "mlp", None)):
            if isinstance(block, (FusedAttention, FusedMLP)):
                for child in block.children():
                    spec = lora_proj(child)
                    if spec is not None and spec[0].lora_A is not None:
                        fp8.get(spec[0].weight)


def restore_model(model: nn.Module) -> nn.Module:
    """Put the original modules back (a no-op on a model that was never accelerated)."""
    causal = _causal_lm(model)
    holders = list(_layers(causal)) + [getattr(causal, "model", None)]
    for holder in holders:
        if holder is None:
            continue
        for name, child in list(holder.named_children()):
            if isinstance(child, _FUSED):
                ref = child.reference_module
                ref.train(child.training)
                setattr(holder, name, ref)
    handle = _HANDLES.pop(causal, None)
    if handle is not None:
        handle._detach()
        if handle.fp8_weights is not None:
            handle.fp8_weights.reload()
    return model


def _plain_head(head: nn.Module | None) -> bool:
    return type(head) is nn.Linear and head.bias is None


def _all_fused(decoder: nn.Module) -> bool:
    layers = list(getattr(decoder, "layers", []))
    return bool(layers) and all(isinstance(getattr(layer, "self_attn", None), FusedAttention) for layer in layers)


def _checkpointed(causal: nn.Module) -> bool:
    """Whether the decoder layers recompute their activations in backward (HF gradient checkpointing)."""
    return any(getattr(layer, "gradient_checkpointing", False) and layer.training for layer in _layers(causal))


def _residual_fusable(layer: nn.Module) -> bool:
    return (type(layer).__name__ in LAYER and isinstance(getattr(layer, "self_attn", None), FusedAttention)
            and isinstance(getattr(layer, "post_attention_layernorm", None), FusedRMSNorm)
            and isinstance(getattr(layer, "input_layernorm", None), nn.Module)
            and not layer._forward_hooks and not layer._forward_pre_hooks)


def fused_layer_body(layer: nn.Module, hidden: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """LlamaDecoderLayer.forward (also Qwen2, Qwen3, Mistral) in training, with `add_rms_norm` after attention:
        x = norm1(hidden);  a = attn(x);  y, h = norm2(hidden + a), hidden + a;  out = h + mlp(y)
    kwargs are the attention's (position_ids, position_embeddings, packed-sequence keys)."""
    x = layer.input_layernorm(hidden)
    a = layer.self_attn(hidden_states=x, attention_mask=None, use_cache=False, **kwargs)[0]
    norm = layer.post_attention_layernorm
    y, h = add_rms_norm(a, hidden, norm.weight, norm.variance_epsilon)
    return h + layer.mlp(y)


def _run_layer(layer: nn.Module, hidden: torch.Tensor, fused_residual: bool, **kwargs: Any) -> torch.Tensor:
    """One decoder layer: its own __call__ (HF forward and checkpointing), or `fused_layer_body` under
    the same checkpointing function HF installed on the layer."""
    if not (fused_residual and _residual_fusable(layer)):
        out = layer(hidden, attention_mask=None, use_cache=False, **kwargs)
        return out[0] if isinstance(out, tuple) else out
    body = partial(fused_layer_body, layer, **kwargs)
    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        return layer._gradient_checkpointing_func(body, hidden)
    return body(hidden)


def decoder_forward(causal: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                    **attn_kwargs: Any) -> torch.Tensor:
    """Last hidden state of an accelerated decoder for an unpadded or packed batch.

    What LlamaModel/Qwen2Model.forward computes in training when every attention is fused and the
    causal (or varlen, via attn_kwargs) structure needs no mask tensor -- without building masks
    and without the host synchronisations of transformers' packed-sequence detection, so the step
    can be captured in a CUDA graph. Padded batches (an attention_mask) go through HF's forward.
    """
    decoder = causal.model
    handle = _HANDLES.get(causal)
    if handle is not None:
        handle.before_forward()  # what the pre-hook on decoder.forward does; this path bypasses that call
    hidden = decoder.embed_tokens(input_ids)
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    position_embeddings = decoder.rotary_emb(hidden, position_ids)
    fused_residual = bool(handle is not None and handle.acceleration.fused_residual)
    for layer in decoder.layers[: decoder.config.num_hidden_layers]:
        hidden = _run_layer(layer, hidden, fused_residual, position_ids=position_ids,
                            position_embeddings=position_embeddings, **attn_kwargs)
    return decoder.norm(hidden)


def causal_lm_loss(model: nn.Module, batch: Mapping[str, Any],
                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of `batch` (input_ids, labels, and attention_mask or pack_batch's keys).

    With fused cross-entropy on, runs the decoder and `fused_causal_lm_loss` on its last hidden
    state; otherwise `model(**batch).loss` (HF's loss, the reference). Both never use a KV cache.
    """
    causal = _causal_lm(model)
    handle = _HANDLES.get(causal)
    acc = handle.acceleration if handle is not None else None
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    if acc is None or not acc.fused_ce or not _plain_head(head) or "labels" not in batch:
        return model(**batch, use_cache=False, **extra).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    packed = "cu_seq_lens_q" in inputs and acc.varlen_attention and inputs["input_ids"].shape[0] == 1
    maskless = "attention_mask" not in inputs and ("position_ids" not in inputs or packed)
    if maskless and _all_fused(causal.model):
        hidden = decoder_forward(causal, **inputs)
    else:
        hidden = causal.model(**inputs, use_cache=False)[0]
    chunk = acc.ce_rows(head.weight.shape[0], _checkpointed(causal))
    return fused_causal_lm_loss(hidden, head.weight, batch["labels"], chunk=chunk,
                                num_items_in_batch=num_items_in_batch)
