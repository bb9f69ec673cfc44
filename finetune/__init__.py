"""personabot fine-tuning: persona data -> QLoRA adapter bundle.

Also silences two third-party messages, here because this runs before any of our modules imports peft or
bitsandbytes (``bot`` imports this package first too).
"""
import logging
import warnings

# bitsandbytes, imported on a CPU with AVX512-BF16, tries to fetch a faster 4-bit kernel from the Hugging Face
# hub and warns "please pip install kernels" when it cannot; its own CPU kernel runs instead, so the warning
# only misleads (offline it would fire on every run).
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage()
)
# peft 0.21 wraps every model by reading transformers 5's deprecated `is_gradient_checkpointing`: a warning meant
# for peft's authors, printed at every training run and bundle load.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
