"""Speed paths for LoRA training on GPU, each beside the plain PyTorch reference it must equal.

One file per fused operation (rmsnorm, rope, swiglu, lora, dropout, cross_entropy, attention), the fused
modules (modules) and the switch that installs them in a PEFT model (accelerate). Padding-free packed
batches are data layout and live in `lorafit.data.packing` (re-exported here for older callers). On a machine without CUDA or Triton every public function takes its
reference path, so CPU training and tests run the same code.
"""
from .accelerate import (Accelerated, Acceleration, accelerate_model, accelerated, causal_lm_loss, decoder_forward,
                         fused_layer_body, restore_model)
from .attention import causal_attention, varlen_attention, varlen_attention_reference
from .cross_entropy import causal_lm_loss_reference, fused_causal_lm_loss
from .dropout import DropoutSeed
from .lora import AdapterCache, LoraProj, lora_group, lora_group_reference
from ..data.packing import pack_batch, pad_batch, plan_packs  # re-exported: packing is data layout, not a kernel
from .rmsnorm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from .rotary import rope, rope_qk, rope_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "Accelerated", "Acceleration", "AdapterCache", "DropoutSeed", "LoraProj", "accelerate_model",
    "accelerated", "add_rms_norm", "add_rms_norm_reference",
    "causal_attention", "decoder_forward", "causal_lm_loss", "causal_lm_loss_reference", "fused_layer_body",
    "fused_causal_lm_loss", "lora_group", "lora_group_reference", "pack_batch", "pad_batch", "plan_packs",
    "restore_model", "rms_norm", "rms_norm_reference", "rope", "rope_qk", "rope_reference", "swiglu",
    "swiglu_reference", "varlen_attention", "varlen_attention_reference",
]
