"""Data sets: class folders (ImageNet layout), ADE20K and COCO layouts, and the bundled digits."""
