"""Small data and a tiny setting for the run-folder and command-line tests: one or two of the
bundled benchmark's smallest tasks, so an epoch is a few steps."""

from sm4.data import load_bundled
from sm4.data.bundled import MultiTaskData
from sm4.model import ModelConfig, Setting, TrainConfig


def small_data(tasks=("wine", "cancer")) -> MultiTaskData:
    data = load_bundled()
    specs = {task: data.tasks[task] for task in tasks}
    modalities = {m: data.modalities[m] for spec in specs.values() for m in spec.modalities}
    return MultiTaskData(modalities, specs, {task: data.splits[task] for task in tasks}, f"bundled {', '.join(tasks)}")


def tiny_setting(epochs=1, cosine=False, **train) -> Setting:
    model = ModelConfig(latent_tokens=4, width=16, cross_head_dim=16, latent_heads=2, latent_head_dim=8, heads=2,
                        ffn_hidden=16, num_experts=4, top_k=2, dropout=0.1)
    return Setting("tiny", model, TrainConfig(epochs=epochs, batch_size=64, lr=3e-3, cosine=cosine, **train))
