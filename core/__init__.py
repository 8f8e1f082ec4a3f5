"""segswap.core: the bottom layer. It imports nothing else from segswap; every other layer may import it.

One copy each of: image reading (:mod:`.images`), listing a folder of images (:mod:`.listing`), atomic writes (:mod:`.atomic`), run logging and
progress (:mod:`.logs`), provenance (:mod:`.provenance`), the YAML-plus-flags config mechanism
(:mod:`.config`), the Ray shard driver (:mod:`.ray_driver`) and the geometry both halves share
(:mod:`.tps`: thin-plate splines, stride-s cell-centre lattices), the one drawing module (:mod:`.viz`)
and the CLI conventions every command shares (:mod:`.cli`: ``--version``, ``--help-all``, exit codes).
"""
