"""cwreg."""
