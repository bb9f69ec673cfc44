"""personabot Discord side: adapter bundles -> streamed in-character replies."""
import finetune  # noqa: F401  (first: its filters of third-party noise must be in place before peft loads)
