"""Export finished runs for local inference: GGUF files (llama.cpp, Ollama, LM Studio) and Ollama Modelfiles."""
