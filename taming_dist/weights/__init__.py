"""Reading and writing weights with no training code: model folders and safe loading of torch files.

A leaf package (it imports only taming_dist.config), so models, losses, tasks and checkpoint tools
can all use it without import cycles."""
