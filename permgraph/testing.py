"""Helpers to test permutation specs: a model zoo built without downloads, norm-statistics
randomisation (so a forgotten buffer shows), and a one-call soundness check.

The zoo needs the optional extras (``vision`` for torchvision/timm, ``hf`` for
transformers); entries whose library is missing raise ImportError when built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ZooEntry", "ZOO", "EXTRA_ZOO", "WIDE_ZOO", "ISLAND_ZOO", "randomize_norm_stats", "check_sound"]


def randomize_norm_stats(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every norm layer random affine parameters and running statistics, and every
    constant parameter random values (in place).

    Freshly built models have BatchNorm ``running_mean = 0``, ``running_var = 1`` and
    ``weight = 1``, and often zero-initialised output heads: a spec that forgot to permute
    such tensors would still pass the oracle. After this, it cannot.
    """
    g = generator or torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # zero-initialised heads, constant layer scales, ...
            if p.is_floating_point() and p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + p)
        for m in model.modules():
            is_norm = isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)) or "Norm" in type(m).__name__
            if not is_norm:
                continue
            for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if not t.is_floating_point():
                    continue
                if name in ("weight", "running_var") or "var" in name:
                    t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    return model


def check_sound(model: nn.Module, example_inputs: Any, *, rtol: float = 1e-4, seed: int = 0):
    """``infer`` + ``lint`` + ``verify`` with norm statistics randomised first.

    Returns:
        ``(spec, error)``: the PermSpec and the relative output error after a random
        permutation of every group.

    Raises:
        VerificationError: a group is not a symmetry (the message names it).
    """
    from permgraph.analysis import infer

    randomize_norm_stats(model, torch.Generator().manual_seed(seed))
    model.eval()
    spec = infer(model, example_inputs)
    spec.lint()
    err = spec.verify(model, example_inputs, rtol=rtol, generator=torch.Generator().manual_seed(seed))
    return spec, err


@dataclass(frozen=True)
class ZooEntry:
    """A model of the zoo: how to build it, an input for it, and a hand-counted floor of groups."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    floor: int
    needs: str = ""


def _tv(name: str, family: str = "", **kw: Any) -> Callable[[], nn.Module]:
    """A torchvision model builder; ``family`` is a sub-package of ``torchvision.models``
    (``video``, ``segmentation``) or empty."""

    def build() -> nn.Module:
        import importlib

        torch.manual_seed(0)
        models = importlib.import_module("torchvision.models" + (f".{family}" if family else ""))
        return getattr(models, name)(weights=None, **kw)

    return build


def _timm(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, **kw)

    return build


def _hf(config: str, model: str, **cfg: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        return getattr(transformers, model)(getattr(transformers, config)(**cfg))

    return build


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32, tie_word_embeddings=True,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def _bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128, vocab_size=100,
        max_position_embeddings=32,
    )
    return BertModel(cfg, add_pooling_layer=False)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def _t5() -> nn.Module:
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    return T5Model(T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4))


def _t5_ids() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 100, (2, 8), generator=g),
            "decoder_input_ids": torch.randint(0, 100, (2, 8), generator=g), "use_cache": False}


def _ids() -> dict[str, Any]:
    return {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0)), "use_cache": False}


def _bert_ids() -> dict[str, Any]:
    return {"input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))}


def _img(size: int) -> Callable[[], torch.Tensor]:
    return lambda: torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("mlp", _mlp, lambda: torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), 3),
        ZooEntry("resnet18", _tv("resnet18"), _img(64), 12, "torchvision"),
        ZooEntry("resnet50", _tv("resnet50"), _img(64), 37, "torchvision"),
        ZooEntry("vgg11_bn", _tv("vgg11_bn"), _img(32), 10, "torchvision"),
        ZooEntry("mobilenet_v2", _tv("mobilenet_v2"), _img(64), 25, "torchvision"),
        ZooEntry("efficientnet_b0", _tv("efficientnet_b0"), _img(64), 40, "torchvision"),
        ZooEntry("densenet121", _tv("densenet121"), _img(64), 120, "torchvision"),
        ZooEntry("convnext_tiny", _tv("convnext_tiny"), _img(64), 22, "torchvision"),
        ZooEntry("vit_b_16", _tv("vit_b_16", image_size=32), _img(32), 13, "torchvision"),
        ZooEntry("swin_t", _tv("swin_t"), _img(64), 16, "torchvision"),
        ZooEntry("timm_resnet26d", _timm("resnet26d"), _img(64), 23, "timm"),
        ZooEntry("timm_vit_tiny", _timm("vit_tiny_patch16_224", img_size=32), _img(32), 13, "timm"),
        ZooEntry("gpt2", _gpt2, _ids, 3, "transformers"),
        ZooEntry("bert", _bert, _bert_ids, 2, "transformers"),
    ]
}

# Beyond the named zoo: architectures with other ops and layouts (channel shuffle, grouped
# convs, squeeze-excitation, token mixing, strided token slicing, grouped-query attention with
# rotary embeddings, relative position buckets). Floors are hand counts where they are easy
# (Llama: residual stream + per layer MLP, heads, query/key and value units), else 1.
EXTRA_ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("shufflenet_v2_x0_5", _tv("shufflenet_v2_x0_5"), _img(64), 1, "torchvision"),
        ZooEntry("resnext50_32x4d", _tv("resnext50_32x4d"), _img(64), 37, "torchvision"),
        ZooEntry("regnet_y_400mf", _tv("regnet_y_400mf"), _img(64), 1, "torchvision"),
        ZooEntry("mobilenet_v3_small", _tv("mobilenet_v3_small"), _img(64), 1, "torchvision"),
        ZooEntry("timm_mixer_s16", _timm("mixer_s16_224", img_size=64), _img(64), 9, "timm"),
        ZooEntry("timm_levit_128s", _timm("levit_128s"), _img(224), 1, "timm"),
        ZooEntry("llama", _llama, _ids, 9, "transformers"),
        ZooEntry("t5", _t5, _t5_ids, 1, "transformers"),
    ]
}

_LM = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
_GQA = dict(_LM, num_key_value_heads=2)
_ENC = dict(_LM, max_position_embeddings=32)

# A wide sample of the world, checked for soundness only (floor 1): every torchvision family,
# timm's convolutional, hybrid, MLP and transformer families, and Hugging Face encoders,
# decoders (their default key/value cache left on: its tensors are outputs) and a state-space
# model. None of them is named in a rule.
WIDE_ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        *(ZooEntry(n, _tv(n, **kw), _img(size), 1, "torchvision") for n, size, kw in [
            ("googlenet", 64, dict(aux_logits=False, init_weights=True)),
            ("inception_v3", 96, dict(aux_logits=False, init_weights=True)),
            ("squeezenet1_0", 64, {}), ("mnasnet0_5", 64, {}), ("efficientnet_v2_s", 64, {}),
            ("maxvit_t", 224, {}), ("swin_v2_t", 64, {}), ("alexnet", 64, {}), ("wide_resnet50_2", 64, {}),
            ("regnet_x_400mf", 64, {}), ("mobilenet_v3_large", 64, {}),
        ]),
        *(ZooEntry(f"timm_{n}", _timm(n, **kw), _img(size), 1, "timm") for n, size, kw in [
            ("efficientformer_l1", 224, {}), ("poolformer_s12", 64, {}), ("deit_tiny_patch16_224", 224, dict(depth=2)),
            ("beit_base_patch16_224", 224, dict(depth=2)), ("cait_xxs24_224", 224, dict(depth=2)),
            ("xcit_nano_12_p16_224", 224, dict(depth=2)), ("mobilevit_xxs", 64, {}), ("ghostnet_050", 64, {}),
            ("dla34", 64, {}), ("dpn68", 64, {}), ("res2net50_26w_4s", 64, {}), ("resnest14d", 64, {}),
            ("cspresnet50", 64, {}), ("hrnet_w18_small", 64, {}), ("convnextv2_atto", 64, {}),
            ("coatnet_0_rw_224", 224, {}), ("pvt_v2_b0", 64, {}), ("eva02_tiny_patch14_224", 224, dict(depth=2)),
            ("rexnet_100", 64, {}), ("repvgg_a0", 64, {}), ("selecsls42b", 64, {}), ("nfnet_l0", 64, {}),
            ("gmlp_s16_224", 224, {}), ("resmlp_12_224", 224, {}), ("tnt_s_patch16_224", 224, {}),
            ("crossvit_9_240", 240, {}), ("edgenext_xx_small", 64, {}), ("fastvit_t8", 64, {}),
            ("inception_next_tiny", 64, {}), ("mambaout_femto", 64, {}),
        ]),
        *(ZooEntry(f"hf_{n}", _hf(f"{m}Config", f"{m}{head}", **cfg), _bert_ids, 1, "transformers") for n, m, head, cfg in [
            ("roberta", "Roberta", "Model", _ENC), ("electra", "Electra", "Model", dict(_ENC, embedding_size=32)),
            ("albert", "Albert", "Model", dict(_ENC, embedding_size=32)), ("deberta_v2", "DebertaV2", "Model", _ENC),
            ("mpnet", "MPNet", "Model", _ENC),
            ("distilbert", "DistilBert", "Model", dict(vocab_size=100, dim=64, n_layers=2, n_heads=4, hidden_dim=128)),
            ("mistral", "Mistral", "ForCausalLM", _GQA), ("qwen2", "Qwen2", "ForCausalLM", _GQA),
            ("gemma", "Gemma", "ForCausalLM", dict(_GQA, head_dim=16)), ("phi", "Phi", "ForCausalLM", _LM),
            ("falcon", "Falcon", "ForCausalLM", dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)),
            ("opt", "OPT", "ForCausalLM", dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=32)),
            ("bloom", "Bloom", "ForCausalLM", dict(vocab_size=100, hidden_size=64, n_layer=2, n_head=4)),
            ("gpt_neo", "GPTNeo", "ForCausalLM", dict(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4,
                                                      attention_types=[[["global", "local"], 1]], max_position_embeddings=32)),
            ("gptj", "GPTJ", "ForCausalLM", dict(vocab_size=100, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)),
            ("gpt_bigcode", "GPTBigCode", "ForCausalLM", dict(vocab_size=100, n_embd=64, n_layer=2, n_head=4)),
            ("bart", "Bart", "Model", dict(vocab_size=100, d_model=64, encoder_layers=1, decoder_layers=1,
                                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                           decoder_ffn_dim=128)),
            ("mamba", "Mamba", "ForCausalLM", dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, state_size=8)),
        ]),
        # a video CNN, a segmentation head, and Hugging Face vision/audio encoders: random
        # token masking (noise -> argsort -> gather), weight-normed positional convolution
        ZooEntry("r3d_18", _tv("r3d_18", "video"), lambda: torch.randn(1, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0)),
                 1, "torchvision"),
        ZooEntry("lraspp_mobilenet_v3_large", _tv("lraspp_mobilenet_v3_large", "segmentation", weights_backbone=None, num_classes=3), _img(64), 1, "torchvision"),
        *(ZooEntry(f"hf_{n}", _hf(f"{m}Config", f"{m}Model", **cfg), inputs, 1, "transformers") for n, m, cfg, inputs in [
            ("vit_mae", "ViTMAE", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=32, patch_size=8), _img(32)),
            ("wav2vec2", "Wav2Vec2", dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                          conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                                          num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4),
             lambda: torch.randn(1, 400, generator=torch.Generator().manual_seed(0))),
            ("segformer", "Segformer", dict(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                                            num_attention_heads=[1, 2], mlp_ratios=[2, 2]), _img(64)),
        ]),
    ]
}


def _detection(name: str, **kw: Any) -> Callable[[], nn.Module]:
    """A torchvision detector without weights, resizing to 128 pixels, keeping every box
    (a score threshold of 0, so the oracle compares detections, not empty lists)."""
    return _tv(name, "detection", weights_backbone=None, **kw)


def _one_image() -> tuple[list[torch.Tensor]]:
    return ([torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0))],)


def _ids16() -> dict[str, Any]:
    return {"input_ids": torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))}


def _seq2seq_ids() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 100, (1, 16), generator=g),
            "decoder_input_ids": torch.randint(0, 100, (1, 8), generator=g)}


_SMALL_RCNN = dict(min_size=128, max_size=128, box_score_thresh=0.0)
_SMALL_ONE_STAGE = dict(min_size=128, max_size=128, score_thresh=0.0)

# Models torch.export cannot trace whole (data-dependent box selection, sliding-window
# attention): `infer` analyses their largest submodules that export as islands
# (permgraph.islands). Floors: the groups found when they were added, rounded down; each takes
# tens of seconds, so tests/test_islands.py runs two and benchmarks/islands.py all of them.
ISLAND_ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("fasterrcnn_mobilenet_v3_large_320_fpn", _detection("fasterrcnn_mobilenet_v3_large_320_fpn", **_SMALL_RCNN),
                 _one_image, 15, "torchvision"),
        ZooEntry("retinanet_resnet50_fpn", _detection("retinanet_resnet50_fpn", **_SMALL_ONE_STAGE), _one_image, 20,
                 "torchvision"),
        ZooEntry("fcos_resnet50_fpn", _detection("fcos_resnet50_fpn", **_SMALL_ONE_STAGE), _one_image, 1, "torchvision"),
        ZooEntry("ssdlite320_mobilenet_v3_large", _detection("ssdlite320_mobilenet_v3_large", score_thresh=0.0), _one_image,
                 1, "torchvision"),
        ZooEntry("maskrcnn_resnet50_fpn", _detection("maskrcnn_resnet50_fpn", **_SMALL_RCNN), _one_image, 1, "torchvision"),
        ZooEntry("keypointrcnn_resnet50_fpn", _detection("keypointrcnn_resnet50_fpn", **_SMALL_RCNN), _one_image, 1,
                 "torchvision"),
        ZooEntry("hf_longformer", _hf("LongformerConfig", "LongformerModel", vocab_size=100, hidden_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                      attention_window=[4, 4], max_position_embeddings=64, pad_token_id=1),
                 _ids16, 1, "transformers"),
        ZooEntry("hf_led", _hf("LEDConfig", "LEDModel", vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, attention_window=[4], max_encoder_position_embeddings=64,
                               max_decoder_position_embeddings=64),
                 _seq2seq_ids, 1, "transformers"),
    ]
}
