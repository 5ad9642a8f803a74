"""Drop-in switches for model libraries and serving engines."""
