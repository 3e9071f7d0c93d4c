"""The backbones boatray can train and cut: one `Entry` per architecture or family (torchvision
ResNets, EfficientNet-Lite0, BetterCNN, any timm CNN), read by `boatray.models`' registry into
one `Backbone` per name."""
