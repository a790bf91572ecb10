"""The census's models: real third-party families with random weights, small configs and no downloads.

Each entry builds ``(model, batch, loss_of)``: ``batch`` is a dict of tensors whose dim 0 is the batch, and
``loss_of(model, batch)`` is a mean over the batch's samples (each sample's loss depends on that sample alone
apart from BatchNorm's batch statistics), so that the two halves of a batch are well defined. Dropout, drop
path and layer drop are off: the compiled step and the eager references must see the same function.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CLASSES = 10


@dataclass
class Spec:
    name: str
    family: str
    build: Callable[[int], tuple]  # batch size -> (model, batch, loss_of)
    small: bool = False  # part of the CI-sized census
    note: str = ""
    kwargs: Dict = field(default_factory=dict)


def _image_loss(model, batch):
    out = model(batch["x"])
    if not isinstance(out, torch.Tensor):  # torchvision's GoogLeNet/Inception outputs, HF-like tuples
        out = out[0]
    return F.cross_entropy(out, batch["y"])


def _images(b, size, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    return {"x": torch.randn(b, 3, size, size, generator=g), "y": torch.randint(0, CLASSES, (b,), generator=g)}


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Zero every dropout-like probability the families use; the census also checks the forward repeats."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for attr in ("drop_prob", "p"):  # timm DropPath, torchvision StochasticDepth
            if type(m).__name__ in ("DropPath", "StochasticDepth") and hasattr(m, attr):
                setattr(m, attr, 0.0)
    return model


# --- torchvision -----------------------------------------------------------------------------------------------

_TV_SMALL = {"resnet18", "squeezenet1_1", "mobilenet_v3_small"}


def _tv_kwargs(name: str, size: int) -> dict:
    kw: dict = {"weights": None, "num_classes": CLASSES}
    if name.startswith("vit_"):
        kw["image_size"] = size
    if name.startswith("maxvit"):
        kw["input_size"] = (size, size)
    if name in ("googlenet", "inception_v3"):
        kw.update(aux_logits=False, init_weights=False)
    return kw


def _tv_build(name: str) -> Callable[[int], tuple]:
    def build(b):
        import torchvision

        last = None
        for size in (32, 64):  # the smallest input each model builds at
            batch = _images(b, size)
            try:
                model = no_dropout(torchvision.models.get_model(name, **_tv_kwargs(name, size)))
                with torch.no_grad():
                    model(batch["x"])
                return model, batch, _image_loss
            except Exception as e:  # noqa: BLE001 -- too small an input: try the next size
                last = e
        raise NotBuildable(f"does not build at 32x32 or 64x64: {type(last).__name__}: {str(last)[:200]}")

    return build


def _tv_tiny_vit(b):
    import torchvision

    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=32, mlp_dim=64, num_classes=CLASSES)
    return no_dropout(model), _images(b, 32), _image_loss


def torchvision_specs() -> List[Spec]:
    import torchvision

    specs = [Spec(n, "torchvision", _tv_build(n), small=n in _TV_SMALL)
             for n in torchvision.models.list_models(module=torchvision.models)]
    specs.append(Spec("tv_vit_tiny", "torchvision", _tv_tiny_vit, small=True, note="VisionTransformer, 2 layers"))
    return specs


# --- timm ------------------------------------------------------------------------------------------------------

# name -> (input size, extra create_model kwargs); ViT-like models get img_size and a shallow depth
_TIMM = {
    "resnet10t": (32, {}), "resnet18": (32, {}), "resnet50d": (32, {}), "resnext26ts": (32, {}),
    "convnext_atto": (32, {}), "convnext_femto_ols": (32, {}), "convnextv2_atto": (32, {}),
    "efficientnet_b0": (32, {}), "efficientnetv2_rw_t": (32, {}), "tf_efficientnet_lite0": (32, {}),
    "mobilenetv2_050": (32, {}), "mobilenetv3_small_050": (32, {}), "mobilenetv4_conv_small": (32, {}),
    "regnetx_002": (32, {}), "regnety_002": (32, {}),
    "vit_tiny_patch16_224": (32, {"img_size": 32, "patch_size": 8, "depth": 2}),
    "deit_tiny_patch16_224": (32, {"img_size": 32, "patch_size": 8, "depth": 2}),
    "deit_tiny_distilled_patch16_224": (32, {"img_size": 32, "patch_size": 8, "depth": 2}),
    "swin_tiny_patch4_window7_224": (32, {"img_size": 32, "window_size": 4, "depths": (1, 1, 1, 1)}),
    "mixer_s32_224": (64, {"img_size": 64}),
    "ghostnet_050": (32, {}), "densenet121": (32, {}), "levit_128s": (64, {"img_size": 64}),
    "poolformer_s12": (32, {}), "pvt_v2_b0": (32, {}),
}
_TIMM_SMALL = {"resnet18", "convnext_atto", "vit_tiny_patch16_224"}


def _timm_build(name: str, size: int, extra: dict) -> Callable[[int], tuple]:
    def build(b):
        import timm

        kw = dict(pretrained=False, num_classes=CLASSES, drop_rate=0.0, **extra)
        try:
            model = timm.create_model(name, drop_path_rate=0.0, **kw)
        except TypeError:  # a family without drop path (GhostNet, DenseNet)
            model = timm.create_model(name, **kw)
        return no_dropout(model), _images(b, size), _image_loss

    return build


def timm_specs() -> List[Spec]:
    return [Spec(f"timm_{n}", "timm", _timm_build(n, s, kw), small=n in _TIMM_SMALL, kwargs=kw)
            for n, (s, kw) in _TIMM.items()]


# --- Hugging Face transformers (tiny configs built in code) ----------------------------------------------------

VOCAB, SEQ = 96, 12
_NO_DROP = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _hf_loss(model, batch):
    return model(**batch).loss


def _tokens(b, gen_seed=1, pad=False):
    g = torch.Generator().manual_seed(gen_seed)
    ids = torch.randint(1, VOCAB, (b, SEQ), generator=g)
    out = {"input_ids": ids}
    if pad:  # right padding: sample i keeps SEQ - (i % 4) tokens
        mask = torch.ones(b, SEQ, dtype=torch.long)
        for i in range(b):
            keep = SEQ - (i % 4)
            mask[i, keep:] = 0
            ids[i, keep:] = 0
        out["attention_mask"] = mask
    return out


def _hf_bert(b):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, max_position_embeddings=64, num_labels=3, **_TINY, **_NO_DROP)
    batch = _tokens(b, pad=True)
    batch["labels"] = torch.randint(0, 3, (b,), generator=torch.Generator().manual_seed(2))
    return BertForSequenceClassification(cfg), batch, _hf_loss


def _hf_distilbert(b):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, dropout=0.0,
                           attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=3, max_position_embeddings=64)
    batch = _tokens(b, pad=True)
    batch["labels"] = torch.randint(0, 3, (b,), generator=torch.Generator().manual_seed(2))
    return DistilBertForSequenceClassification(cfg), batch, _hf_loss


def _hf_gpt2(b):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    batch = _tokens(b)
    batch["labels"] = batch["input_ids"].clone()  # every sample has SEQ-1 targets: the token mean is a sample mean
    return GPT2LMHeadModel(cfg), batch, _hf_loss


def _hf_llama(b):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
                      attention_dropout=0.0)
    batch = _tokens(b)
    batch["labels"] = batch["input_ids"].clone()
    return LlamaForCausalLM(cfg), batch, _hf_loss


def _hf_t5(b):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0, use_cache=False)
    batch = _tokens(b)
    batch["labels"] = torch.randint(1, VOCAB, (b, 6), generator=torch.Generator().manual_seed(3))
    return T5ForConditionalGeneration(cfg), batch, _hf_loss


def _hf_vit(b):
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=32, patch_size=8, num_labels=CLASSES, **_TINY, **_NO_DROP)
    img = _images(b, 32)
    return ViTForImageClassification(cfg), {"pixel_values": img["x"], "labels": img["y"]}, _hf_loss


def _hf_wav2vec2(b):
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    cfg = Wav2Vec2Config(vocab_size=VOCAB, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, num_labels=3,
                         classifier_proj_size=16, mask_time_prob=0.0, mask_feature_prob=0.0, layerdrop=0.0,
                         hidden_dropout=0.0, activation_dropout=0.0, attention_dropout=0.0, feat_proj_dropout=0.0,
                         final_dropout=0.0, **_TINY)
    g = torch.Generator().manual_seed(4)
    batch = {"input_values": torch.randn(b, 400, generator=g), "labels": torch.randint(0, 3, (b,), generator=g)}
    return Wav2Vec2ForSequenceClassification(cfg), batch, _hf_loss


def _hf_whisper(b):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    cfg = WhisperConfig(vocab_size=VOCAB, num_mel_bins=8, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_source_positions=16, max_target_positions=32, dropout=0.0, attention_dropout=0.0,
                        activation_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0, use_cache=False,
                        decoder_start_token_id=1, pad_token_id=0, mask_time_prob=0.0)
    g = torch.Generator().manual_seed(5)
    batch = {"input_features": torch.randn(b, 8, 32, generator=g),
             "labels": torch.randint(2, VOCAB, (b, 6), generator=g)}
    return WhisperForConditionalGeneration(cfg), batch, _hf_loss


def transformers_specs() -> List[Spec]:
    table = [("hf_bert_padded", _hf_bert, True), ("hf_distilbert_padded", _hf_distilbert, False),
             ("hf_gpt2", _hf_gpt2, False), ("hf_llama_labels", _hf_llama, True), ("hf_t5", _hf_t5, False),
             ("hf_vit", _hf_vit, False), ("hf_wav2vec2", _hf_wav2vec2, False), ("hf_whisper", _hf_whisper, False)]
    return [Spec(n, "transformers", f, small=s) for n, f, s in table]


class NotBuildable(Exception):
    """The model cannot be built at the census's input sizes: it is skipped, and said so."""


# One model of each torchvision family first, so that a census cut short has still seen every family
_TV_FIRST = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_32",
             "swin_t", "squeezenet1_1", "densenet121", "shufflenet_v2_x0_5", "mnasnet0_5", "regnet_x_400mf",
             "googlenet", "alexnet", "resnext50_32x4d", "efficientnet_v2_s", "swin_v2_t", "vgg11_bn"]


def all_specs() -> List[Spec]:
    tv = sorted(torchvision_specs(), key=lambda s: _TV_FIRST.index(s.name) if s.name in _TV_FIRST else 99)
    return transformers_specs() + timm_specs() + tv


def select(size: str, only: str | None) -> List[Spec]:
    specs = all_specs()
    if size == "small":
        specs = [s for s in specs if s.small]
    if only:
        specs = [s for s in specs if re.search(only, s.name)]
    return specs
