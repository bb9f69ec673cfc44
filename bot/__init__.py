"""personabot Discord side: adapter bundles -> streamed in-character replies."""
