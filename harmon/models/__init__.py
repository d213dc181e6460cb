"""The network: VAE (vae.py), MAR encoder/decoder (mar.py), diffusion head network (head.py),
diffusion maths (diffusion.py), the Qwen2 LLM glue (llm.py) and the whole model (harmon.py)."""
