"""Reading images and image folders: one place for formats, EXIF, labels, sharding and collation."""
