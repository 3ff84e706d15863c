"""Engine adapters: the real-time emulator and vLLM."""
