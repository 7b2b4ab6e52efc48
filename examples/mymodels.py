"""A network of one's own, in a module of one's own: ``model.name: mymodels:small_cnn`` with this
folder on ``PYTHONPATH`` (README, "Your own images and your own network").

The harness calls ``small_cnn(num_classes=..., in_channels=..., image_size=...)`` with the
dataset's numbers (for ``dataset.name: folder`` they come from the training file's write
record), so the same function serves grey and RGB images of any size divisible by 4.
"""
from torch import nn


def small_cnn(num_classes: int, in_channels: int = 1, image_size: int = 28, width: int = 16) -> nn.Module:
    """conv 3x3 - ReLU - max-pool 2 - conv 3x3 - ReLU - max-pool 2 - fc 128 - ReLU - fc classes."""
    quarter = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, width, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * quarter * quarter, 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )
