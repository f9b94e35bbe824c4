"""ipaflow tasks: storage I/O, media, model resolution, pipeline building, rendering, writers."""
