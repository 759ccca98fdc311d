"""echoink: GRPO fine-tuning of omni-modal language models (Qwen2.5-Omni, Qwen3-Omni) on audio-visual reasoning."""

__version__ = "0.1.0"
