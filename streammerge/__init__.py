"""streammerge: stream sharded FSDP checkpoints into Hugging Face safetensors."""
