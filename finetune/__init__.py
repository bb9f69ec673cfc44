"""personabot fine-tuning: persona data -> QLoRA adapter bundle."""
