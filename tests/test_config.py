import pytest

from qformer.config import QFormerConfig, list_presets


def test_blip2_preset_matches_the_paper():
    cfg = QFormerConfig.from_name("blip2")
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) == (12, 768, 12, 3072)
    assert (cfg.num_query_tokens, cfg.cross_attention_freq, cfg.vision_width) == (32, 2, 1408)
    assert cfg.vocab_size == 30523 and cfg.dec_token_id == 30522  # BERT vocab + [DEC]
    assert cfg.layer_norm_eps == 1e-12 and cfg.embed_dim == 256 and cfg.init_temp == 0.07
    assert [i for i in range(cfg.num_layers) if cfg.has_cross_attention(i)] == [0, 2, 4, 6, 8, 10]


def test_presets_listed():
    assert {"blip2", "tiny"} <= set(list_presets())


def test_round_trip_through_file(tmp_path):
    cfg = QFormerConfig.from_name("tiny", num_query_tokens=7, meta={"bert": "x"})
    cfg.save(tmp_path / "c.json")
    assert QFormerConfig.from_file(tmp_path / "c.json") == cfg


def test_all_problems_reported_at_once():
    with pytest.raises(ValueError) as err:
        QFormerConfig(hidden_size=100, num_heads=12, num_query_tokens=0, hidden_dropout=1.5)
    msg = str(err.value)
    assert "hidden_size" in msg and "num_heads" in msg
    assert "num_query_tokens" in msg and "hidden_dropout" in msg


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match="num_querys.*valid keys.*num_query_tokens"):
        QFormerConfig.from_dict({"num_querys": 4})


def test_unknown_preset():
    with pytest.raises(ValueError, match="choose one of"):
        QFormerConfig.from_name("blip3")


def test_token_ids_must_fit_vocab():
    with pytest.raises(ValueError, match="dec_token_id"):
        QFormerConfig.from_name("tiny", dec_token_id=100)
