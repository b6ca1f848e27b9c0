"""deepscaler: reproduce DeepScaleR (GRPO on DeepSeek-R1-Distill-Qwen-1.5B) on Slurm clusters."""

__version__ = "0.1.0"
