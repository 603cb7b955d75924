"""A tiny run config for trainer tests (prompts data, tiny Wan models, tiny text encoder)."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = os.path.join(ROOT, "configs", "prompts", "example_prompts.txt")


def tiny_dmd2_dict(output_dir, max_steps=8, every=4, generator_update_interval=2):
    return {
        "recipe": {"family": "wan", "method": "dmd2"},
        "models": {"student": {"preset": "tiny"}, "teacher": {"preset": "tiny"},
                   "critic": {"preset": "tiny"}},
        "training": {"seed": 3, "max_steps": max_steps, "micro_batch_size": 2, "lr": 1e-3,
                     "betas": [0.0, 0.999], "grad_clip": 10.0, "optim": {"critic": {"lr": 2e-3}},
                     "ema": {"decay": 0.9, "start_step": 2}},
        "pipeline_config": {"latent_shape": [16, 2, 4, 4], "text_len": 16, "flow_shift": 5.0,
                            "text_encoder": "tiny"},
        "method_config": {"denoising_steps": [1000, 750, 500, 250], "warp_denoising_step": True,
                          "generator_update_interval": generator_update_interval,
                          "guidance_scale": 3.0, "guidance_convention": "cfg"},
        "data": {"kind": "prompts", "path": PROMPTS},
        "logging": {"output_dir": str(output_dir), "log_every": 1, "tensorboard": True},
        "checkpoint": {"every": every, "keep_last": 0},
    }
