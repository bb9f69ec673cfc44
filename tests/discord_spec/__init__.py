"""Discord's published OpenAPI description (the part the fake serves) and a checker for the fake's replies."""
from .validate import SpecCheck, SpecViolation

__all__ = ["SpecCheck", "SpecViolation"]
