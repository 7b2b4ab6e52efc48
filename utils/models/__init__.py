"""Models: the model registry (torchvision, CIFAR/MNIST families, ViTs, ``package.module:factory``),
the masked layers that carry every prunable weight's mask, given initial weights, BlurPool.

May import: ``utils.core``."""
