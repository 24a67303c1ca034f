"""asyncopd."""
