"""Member role: samples CPU, keeps the raw mean private, publishes a differentially private mean."""
