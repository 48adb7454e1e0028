"""Text-to-image LoRA / LoHa / LoKr training for Stable Diffusion (noise prediction with a DDPM scheduler), CPU-sized.

The UNet and the CLIP text encoder are tiny random models built from configs with SD 1.5's block structure, and
the "images" are synthetic 4x8x8 latents (one pattern per prompt), so the script runs in seconds anywhere.
With a real pipeline you would take ``pipe.unet`` / ``pipe.text_encoder``, encode images with ``pipe.vae``
(times ``vae.config.scaling_factor``) and prompts with ``pipe.tokenizer``; the loop is the same (DDPM, Ho et al.
2020, eq. 14): pick t ~ U{0..T-1} and noise ε, form x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, minimise
|ε - ε_θ(x_t, t, text)|².

    python examples/train_sd_lora.py --steps 60 --out sd_lora.safetensors
    python examples/train_sd_lora.py --method loha --out sd_loha.safetensors   # a LyCORIS file (kohya layout)
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from peftkit import LoHaConfig, LoKrConfig, get_peft_model
from peftkit.integrations.diffusers import PRESETS, save_lora, sd_lora_config
from peftkit.integrations.lycoris import write_lycoris

PROMPTS = {"a red square": 0, "a blue circle": 1, "a green line": 2}  # prompt -> pattern index
METHODS = ("lora", "loha", "lokr")


def tiny_unet(seed: int = 0):
    """UNet2DConditionModel shaped like SD 1.5 (cross-attention down / up blocks, 2 layers per block), tiny."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def tiny_text_encoder(seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=24,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config).eval()


def tokenize(prompts: list[str], length: int = 16) -> torch.Tensor:
    """A stand-in for CLIPTokenizer: one id per word (hashed into the tiny vocabulary), padded."""
    rows = []
    for prompt in prompts:
        ids = [0] + [2 + sum(map(ord, w)) % 98 for w in prompt.split()] + [1]
        rows.append(ids + [1] * (length - len(ids)))
    return torch.tensor(rows)


def latents_for(prompts: list[str]) -> torch.Tensor:
    """A fixed 4x8x8 "image" per prompt, the data the LoRA learns to denoise."""
    gen = torch.Generator().manual_seed(1234)
    patterns = torch.randn(len(PROMPTS), 4, 8, 8, generator=gen)
    return patterns[[PROMPTS[p] for p in prompts]]  # (B, 4, 8, 8)


def diffusion_loss(unet, text_encoder, scheduler, prompts: list[str], gen: torch.Generator) -> torch.Tensor:
    x0 = latents_for(prompts)
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
    xt = scheduler.add_noise(x0, noise, t)  # sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε
    text = text_encoder(tokenize(prompts)).last_hidden_state  # (B, 16, 24)
    pred = unet(xt, t, encoder_hidden_states=text).sample  # (B, 4, 8, 8)
    return F.mse_loss(pred, noise)


def adapter_config(method: str, preset: str, rank: int, alpha: float):
    """LoRA through sd_lora_config; LoHa / LoKr (LyCORIS) on the same modules (peft's LoHaConfig / LoKrConfig)."""
    if method == "lora":
        return sd_lora_config(preset, r=rank, alpha=alpha)
    config_class = {"loha": LoHaConfig, "lokr": LoKrConfig}[method]
    return config_class(r=rank, alpha=alpha, target_modules=PRESETS[preset])


def main(
    steps: int = 60,
    rank: int = 8,
    lr: float = 3e-3,
    batch: int = 6,
    out: str | None = None,
    seed: int = 0,
    method: str = "lora",
    return_models: bool = False,
):
    """Train UNet + text-encoder adapters (``method``: 'lora', 'loha' or 'lokr'); return the training losses and a
    fixed evaluation loss before / after (and the trained models with ``return_models``)."""
    from diffusers import DDPMScheduler

    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}.")
    torch.manual_seed(seed)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    unet = get_peft_model(tiny_unet(), adapter_config(method, "sd-unet-transformer", rank, rank))
    text_encoder = get_peft_model(tiny_text_encoder(), adapter_config(method, "sd-text-encoder", rank // 2, rank // 2))
    params = [p for m in (unet, text_encoder) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    prompts = [list(PROMPTS)[i % len(PROMPTS)] for i in range(batch)]

    def evaluate() -> float:
        with torch.no_grad():
            return diffusion_loss(unet, text_encoder, scheduler, prompts * 4, torch.Generator().manual_seed(7)).item()

    before, losses = evaluate(), []
    gen = torch.Generator().manual_seed(seed)
    unet.train(), text_encoder.train()
    for _ in range(steps):
        loss = diffusion_loss(unet, text_encoder, scheduler, prompts, gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    unet.eval(), text_encoder.eval()
    after = evaluate()
    pipe = SimpleNamespace(unet=unet, text_encoder=text_encoder)
    if out and method == "lora":  # one kohya / A1111 file holding both components' LoRA
        save_lora(pipe, out, "default", format="kohya")
    elif out:  # one LyCORIS file (kohya's key layout, hada_* / lokr_* tensors)
        write_lycoris(pipe, out, "default")
    result = {"losses": losses, "eval_before": before, "eval_after": after}
    return {**result, "pipe": pipe} if return_models else result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--method", choices=METHODS, default="lora", help="LoRA, or LyCORIS' LoHa / LoKr")
    parser.add_argument("--out", default=None, help="write the adapter as a kohya / LyCORIS .safetensors file")
    args = parser.parse_args()
    result = main(args.steps, args.rank, args.lr, out=args.out, method=args.method)
    first, last = result["losses"][:10], result["losses"][-10:]
    print(f"train loss {sum(first) / len(first):.4f} -> {sum(last) / len(last):.4f}")
    print(f"eval loss  {result['eval_before']:.4f} -> {result['eval_after']:.4f}")
