"""Target profiles (TOML data) shipped with edgeq as package ``edgeq._targets``."""
