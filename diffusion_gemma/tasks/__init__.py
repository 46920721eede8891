"""Tasks: each subpackage plugs a task's data sources, evaluators and model presets into the core registries
(`diffusion_gemma.registry`). The core never imports a task; the registry finds them by name."""
