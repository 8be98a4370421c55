"""GGUF checkpoints: the file reader, the model loader, llama.cpp's RoPE layout, the tokenizer."""
