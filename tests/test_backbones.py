"""The ShapesWorld backbones: tokenizers shaped like their families, and tiny trained backbones
that the bridges load like downloaded ones, cached and reused."""

import json
from pathlib import Path

import open_clip
import pytest
import torch

from bridges.language import LanguageBridge
from bridges.vision import VisionBridge
from qformer.world import backbones, shapes

TEXTS = list(shapes.iter_lm_texts("simple", n=300))


def test_opt_tokenizer_prepends_bos_and_newline_is_one_token():
    tok = backbones.world_tokenizer(TEXTS, "opt")
    assert tok.bos_token == tok.eos_token == "</s>" and tok.pad_token == "<pad>" and tok.unk_token == "<unk>"
    ids = tok("a red circle")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1:] == tok("a red circle", add_special_tokens=False)["input_ids"]
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(newline) == ["Ċ"]
    # every world word is one token (with its leading space), and text round-trips
    for word in (*shapes.COLOURS, *shapes.SHAPES, *shapes.SIZES):
        assert len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1, word
    text = "scene : small red circle top left . caption : a red circle in the top left\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_t5_tokenizer_appends_eos_pad_zero():
    tok = backbones.world_tokenizer(TEXTS, "t5")
    assert tok.pad_token_id == 0 and tok.eos_token == "</s>" and tok.eos_token_id == 1 and tok.bos_token is None
    ids = tok("a red circle")["input_ids"]
    assert ids[-1] == tok.eos_token_id and ids[:-1] == tok("a red circle", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle"


def test_lm_example_pads_the_scene_slot():
    context, target = backbones.lm_example("scene : small red circle left . caption : a red circle", num_queries=8)
    assert context == "scene : small red circle left none none none none ."
    assert target == "caption : a red circle"
    long = "scene : a b c d e f g h i j . question : q? answer : yes"
    assert backbones.lm_example(long, num_queries=4)[0] == "scene : a b c d e f g h i j ."


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_lm_reads_its_scene_slot_where_stage_2_puts_the_soft_prompt(kind, tmp_path):
    """The world LM's training rows are what the language bridge builds in stage 2 for a soft
    prompt of the slot's words, the prompt ". caption :" (". question : ... answer :") and the
    caption (answer): same tokens after the slot, and the caption's labels among the LM's."""
    small = dict(steps=1, batch_size=8, hidden=32, layers=1, heads=2, n_texts=100, log_every=100)
    llm_dir = backbones.train_world_lm(kind, "simple", tmp_path / kind, **small)
    bridge = LanguageBridge.from_pretrained(llm_dir)
    tok, embed = bridge.tokenizer, bridge.model.get_input_embeddings()
    # a slot of words: tied, as OPT's are (the installed T5Config ties T5's whatever it is given)
    assert embed.weight.data_ptr() == bridge.model.get_output_embeddings().weight.data_ptr()
    pairs = [backbones.lm_example(t, num_queries=8) for t in TEXTS[:6]]
    assert {t.split()[0] for _, t in pairs} == {"caption", "question"}  # both tasks are checked
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    batch = backbones._lm_batch(kind, tok, pairs, newline)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    for row, (context, _) in zip(ids, pairs):  # the slot's 8 words open every row
        assert tok.decode(row[:8]).split() == context.split()[2:-1]
    prompts, texts = [], []
    for _, target in pairs:
        lead, _, rest = target.rpartition(" : ")
        prompts.append(f". {lead} :")
        texts.append(rest)
    slot_embeds = embed(ids[:, :8]).detach()
    theirs = bridge.training_inputs(slot_embeds, texts, prompts)
    ours_embeds = embed(ids).detach()
    n = min(theirs["inputs_embeds"].shape[1], ours_embeds.shape[1])
    both = (theirs["attention_mask"][:, :n] == 1) & (mask[:, :n] == 1)
    assert torch.equal(theirs["attention_mask"][:, :n].bool(), both) and torch.equal(mask[:, :n].bool(), both)
    torch.testing.assert_close(theirs["inputs_embeds"][:, :n][both], ours_embeds[:, :n][both])
    if kind == "opt":  # a label of the bridge's (the caption, the answer, "\n") is the LM's too
        labelled = theirs["labels"] != -100
        assert labelled.sum() > 0 and torch.equal(theirs["labels"][labelled], batch["labels"][:, : labelled.shape[1]][labelled])
    else:  # T5: the decoder writes the same caption / answer + EOS
        assert torch.equal(theirs["labels"], batch["labels"])


def test_blend_scene_slot_by_hand():
    embeds = torch.randn(3, 12, 5)
    out = backbones.blend_scene_slot(embeds, 2, 4, torch.tensor([0.0, 1.0, 0.25]))
    mean = embeds[:, 2:6].mean(dim=1)
    torch.testing.assert_close(out[0], embeds[0])  # a = 0: unchanged
    torch.testing.assert_close(out[1, 2:6], mean[1].expand(4, 5))  # a = 1: every position the mean
    torch.testing.assert_close(out[2, 3], 0.75 * embeds[2, 3] + 0.25 * mean[2])
    torch.testing.assert_close(out[:, :2], embeds[:, :2])
    torch.testing.assert_close(out[:, 6:], embeds[:, 6:])  # outside the slot: untouched
    with pytest.raises(ValueError, match="runs past"):
        backbones.blend_scene_slot(embeds, 10, 4, torch.zeros(3))


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_train_world_lm_blends_the_scene_slot(kind, tmp_path, monkeypatch):
    seen = []
    blend = backbones.blend_scene_slot

    def spy(embeds, start, length, alpha):
        seen.append((start, length, alpha.clone()))
        return blend(embeds, start, length, alpha)

    monkeypatch.setattr(backbones, "blend_scene_slot", spy)
    small = dict(steps=3, batch_size=8, hidden=32, layers=1, heads=2, n_texts=100, log_every=100)
    backbones.train_world_lm(kind, "simple", tmp_path / "plain", **small)
    assert seen == []  # off by default
    backbones.train_world_lm(kind, "simple", tmp_path / "blend", slot_blend=0.5, **small)
    assert len(seen) == 3 and all(s[:2] == (0, 8) for s in seen)  # the slot opens each row
    alphas = torch.cat([s[2] for s in seen])
    assert alphas.shape == (24,) and 0.0 <= alphas.min() and alphas.max() <= 0.5 and alphas.std() > 0
    info = json.loads((tmp_path / "blend" / "lm_train_info.txt").read_text())
    assert info["slot_blend"] == 0.5 and info["steps_done"] == 3
    # same seed, data and order: the blended embeddings are what made the weights differ
    from safetensors.torch import load_file

    plain, blended = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "blend" / "model.safetensors")
    assert plain.keys() == blended.keys() and any(not torch.equal(plain[k], blended[k]) for k in plain)
    again = tmp_path / "plain2"
    backbones.train_world_lm(kind, "simple", again, **small)
    assert all(torch.equal(plain[k], t) for k, t in load_file(again / "model.safetensors").items())
    with pytest.raises(ValueError, match="slot_blend"):
        backbones.train_world_lm(kind, "simple", tmp_path / "bad", slot_blend=1.5, **small)
    with pytest.raises(ValueError, match="raise `num_queries`"):  # "big red circle top left" is 5 words
        backbones.train_world_lm(kind, "simple", tmp_path / "short", slot_blend=0.5, **{**small, "num_queries": 3})


def test_noisy_slot_by_hand():
    torch.manual_seed(0)
    vectors = torch.randn(64, 8, 128) * torch.linspace(0.1, 10.0, 64)[:, None, None]  # rows of very different scale
    vectors.requires_grad_(True)
    out = backbones.noisy_slot(vectors, 0.5, torch.Generator().manual_seed(3))
    noise = (out - vectors).detach()
    rms = vectors.detach().pow(2).mean(dim=(1, 2)).sqrt()
    ratio = noise.std(dim=(1, 2)) / rms
    assert ratio.min() > 0.45 and ratio.max() < 0.55  # half each row's RMS, whatever its scale
    assert (noise.mean(dim=(1, 2)).abs() < 0.1 * rms).all()  # centred (six standard errors)
    torch.testing.assert_close(noise, backbones.noisy_slot(vectors, 0.5, torch.Generator().manual_seed(3)).detach() - vectors.detach())
    out.sum().backward()  # the RMS is not differentiated through: the gradient passes unchanged
    torch.testing.assert_close(vectors.grad, torch.ones_like(vectors))
    torch.testing.assert_close(backbones.noisy_slot(vectors, 0.0, torch.Generator()), vectors)


def test_slot_objects_reads_the_objects_of_a_context():
    context, _ = backbones.lm_example("scene : small red circle left , large blue star top right . caption : x", num_queries=12)
    assert backbones.slot_objects(context) == ["small red circle left", "large blue star top right"]
    assert backbones.slot_objects("scene : none none none .") == []


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_object_slot_embeds_by_hand(kind):
    pairs = [backbones.lm_example(t) for t in shapes.iter_lm_texts("full", n=300)]
    tok = backbones.world_tokenizer([c + " " + t for c, t in pairs], kind)
    torch.manual_seed(0)
    embed = torch.nn.Embedding(len(tok), 6)
    objects = [["small red circle left", "large blue star top right"], ["big green square centre"]]
    out = backbones.object_slot_embeds(embed, kind, tok, objects, [[3, 0], [5]], num_queries=6)
    assert out.shape == (2, 6, 6)

    def words_slot(words: str) -> torch.Tensor:  # the words' embeddings as a "words" slot lays them out
        ids = backbones._lm_inputs(kind, tok, [words], ["caption :"])[0][: len(words.split())]
        return embed(torch.tensor(ids))

    filler = words_slot("none")[0]
    torch.testing.assert_close(out[0, 3], words_slot("small red circle left").sum(0))
    torch.testing.assert_close(out[0, 0], words_slot("large blue star top right").sum(0))
    torch.testing.assert_close(out[1, 5], words_slot("big green square centre").sum(0))
    for i, free in ((0, [1, 2, 4, 5]), (1, [0, 1, 2, 3, 4])):
        torch.testing.assert_close(out[i, free], filler.expand(len(free), 6))
    for bad in ([[3, 3], [5]], [[0, 6], [5]], [[0], [5]]):
        with pytest.raises(ValueError, match="distinct places"):
            backbones.object_slot_embeds(embed, kind, tok, objects, bad, num_queries=6)
    with pytest.raises(ValueError, match=r"'nothing' is \d+ tokens"):  # not a word of this world
        backbones.object_slot_embeds(embed, kind, tok, objects, [[3, 0], [5]], num_queries=6, filler="nothing")


@pytest.mark.parametrize("kind", ["opt", "t5"])
def test_train_world_lm_with_one_slot_position_per_object(kind, tmp_path, monkeypatch):
    seen = []
    real = backbones.object_slot_embeds

    def spy(embedding, kind_, tok, objects, places, **kw):
        seen.append((list(map(list, objects)), [list(p) for p in places], kw["num_queries"]))
        return real(embedding, kind_, tok, objects, places, **kw)

    monkeypatch.setattr(backbones, "object_slot_embeds", spy)
    small = dict(steps=4, batch_size=16, hidden=32, layers=1, heads=2, n_texts=200, log_every=100)
    llm_dir = backbones.train_world_lm(kind, "full", tmp_path / "objects", slot="objects", **small)
    assert len(seen) == 4
    rows = [(o, p) for objects, places, nq in seen for o, p in zip(objects, places)]
    assert all(nq == 8 for *_, nq in seen) and len(rows) == 64
    assert {len(o) for o, _ in rows} == {1, 2, 3}  # the full world's scenes
    assert all(len(o) == len(p) == len(set(p)) and all(0 <= q < 8 for q in p) for o, p in rows)
    assert len({tuple(p) for _, p in rows}) > 10  # drawn at random, not always the first positions
    vocabulary = set(shapes.SIZES) | set(shapes.COLOURS) | set(shapes.SHAPES) | {w for p in shapes.POSITIONS for w in p.split()}
    assert all(set(obj.split()) <= vocabulary for o, _ in rows for obj in o)
    info = json.loads((tmp_path / "objects" / "lm_train_info.txt").read_text())
    assert info["slot"] == "objects" and info["steps_done"] == 4

    # the true-words ceiling feeds such an LM the objects' vectors, in the slot's first positions
    seen.clear()
    found = backbones.evaluate_world_lm(llm_dir, "full", n=6, batch_size=4)
    assert [len(s[0]) for s in seen] == [4, 2, 4, 2]  # captions, then questions, in batches of 4
    assert all(p == list(range(len(o))) for objects, places, _ in seen for o, p in zip(objects, places))
    # its example caption is the greedy continuation of that slot, BOS and ". caption :", built here by hand
    bridge = LanguageBridge.from_pretrained(llm_dir)
    tok, model = bridge.tokenizer, bridge.model
    if kind == "opt":  # the slot's sums come from input embeddings of their own: untied here
        assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
        assert not torch.equal(model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    first = seen[0][0][0]
    vectors = real(model.get_input_embeddings(), kind, tok, [first], [range(len(first))], num_queries=8)
    rest = backbones._lm_inputs(kind, tok, ["none " * 7 + "none"], ["caption :"])[0][8:]
    embeds = torch.cat([vectors, model.get_input_embeddings()(torch.tensor([rest]))], dim=1)
    stop = tok.eos_token_id if kind == "t5" else tok("\n", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        gen = model.generate(inputs_embeds=embeds, max_new_tokens=60, do_sample=False, num_beams=1, eos_token_id=stop,
                             pad_token_id=tok.pad_token_id)  # fmt: skip
    assert found["example_caption"] == tok.batch_decode(gen, skip_special_tokens=True)[0].split("\n")[0].strip()

    # noise on the slot (same seed, texts and places): the weights differ, the run says so
    monkeypatch.setattr(backbones, "object_slot_embeds", real)
    noised = []
    noisy = backbones.noisy_slot
    monkeypatch.setattr(backbones, "noisy_slot", lambda v, scale, g: noised.append(scale) or noisy(v, scale, g))
    backbones.train_world_lm(kind, "full", tmp_path / "noisy", slot="objects", slot_noise=0.5, **small)
    assert noised == [0.5] * 4
    assert json.loads((tmp_path / "noisy" / "lm_train_info.txt").read_text())["slot_noise"] == 0.5
    from safetensors.torch import load_file

    plain, with_noise = load_file(tmp_path / "objects" / "model.safetensors"), load_file(tmp_path / "noisy" / "model.safetensors")
    assert plain.keys() == with_noise.keys() and any(not torch.equal(plain[k], with_noise[k]) for k in plain)
    for bad in (dict(slot="objects", slot_noise=-0.1), dict(slot_noise=0.5)):  # negative; a slot of words
        with pytest.raises(ValueError, match="slot_noise"):
            backbones.train_world_lm(kind, "full", tmp_path / "bad_noise", **bad, **small)
    with pytest.raises(ValueError, match="slot_blend"):
        backbones.train_world_lm(kind, "full", tmp_path / "both", slot="objects", slot_blend=0.5, **small)
    with pytest.raises(ValueError, match="raise `num_queries` to at least 3"):
        backbones.train_world_lm(kind, "full", tmp_path / "short", slot="objects", **{**small, "num_queries": 2})
    with pytest.raises(ValueError, match="`slot` must be"):
        backbones.train_world_lm(kind, "full", tmp_path / "bad", slot="bags", **small)


def test_vit_config_and_position_embedding_scale(tmp_path):
    config = backbones._vit_config(image_size=32, patch_size=8, width=64, layers=1, heads=2, embed_dim=16,
                                   vocab_size=20, context_length=8, text_width=32, text_layers=1)  # fmt: skip
    assert config["vision_cfg"]["no_ln_pre"] is True and not config.get("quick_gelu")
    path = tmp_path / "qformer-test-world-vit-scale.json"
    path.write_text(json.dumps(config))
    name = backbones.register_vit_config(path)
    torch.manual_seed(0)
    plain = open_clip.create_model(name).visual.positional_embedding.std().item()
    torch.manual_seed(0)
    scaled = backbones.create_world_clip(name).visual.positional_embedding.std().item()
    assert plain == pytest.approx(64**-0.5, rel=0.1)  # open_clip's default init
    assert scaled == pytest.approx(8 * plain, rel=1e-4)


def test_ensure_backbones_loads_through_bridges_and_reuses_cache(tmp_path, monkeypatch):
    paths = backbones.ensure_backbones("simple", cache_dir=tmp_path, fast=True)
    assert set(paths) == {"vit_name", "vit_weights", "vit_config", "llm_dir", "bert_dir"}
    config = json.loads(Path(paths["vit_config"]).read_text())
    assert config["vision_cfg"]["no_ln_pre"] is True

    vision = VisionBridge.from_open_clip(paths["vit_name"], paths["vit_weights"])
    assert vision.image_size == 63  # one 21x21 patch per cell of the world's 3x3 layout
    tokens = vision(torch.zeros(2, 3, 63, 63))
    assert tokens.shape == (2, 1 + 3 * 3, config["vision_cfg"]["width"])

    language = LanguageBridge.from_pretrained(paths["llm_dir"])
    assert language.end_of_text == "newline"
    assert language.model.config.model_type == "opt"

    # the world BERT initialises a Q-Former like any BERT checkpoint, its MLM head the ITG head
    from qformer.bert_init import config_from_bert, init_from_bert
    from qformer.stage1 import Stage1Model

    report = init_from_bert(Stage1Model(config_from_bert(paths["bert_dir"], vision_width=32, num_query_tokens=4)),
                            paths["bert_dir"])  # fmt: skip
    assert "qformer.layers.0.self_attn.q.weight" in report.loaded and "lm_head.bias" in report.loaded

    # no leftovers of the atomic build
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # a second call trains nothing
    def boom(*args, **kwargs):
        raise AssertionError("retrained a cached backbone")

    monkeypatch.setattr(backbones, "train_world_vit", boom)
    monkeypatch.setattr(backbones, "train_world_lm", boom)
    monkeypatch.setattr(backbones, "train_world_bert", boom)
    monkeypatch.setattr(shapes, "generate_world", boom)
    assert backbones.ensure_backbones("simple", cache_dir=tmp_path, fast=True) == paths


def test_ensure_backbones_t5_trained_side_by_side(tmp_path, monkeypatch):
    """The LM trains in a second process (one thread) beside the ViT, which starts on one thread
    (three threads on two cores ran the ViT ten times slower); this process gets its threads back
    afterwards."""
    threads_at_start: list[int] = []
    train_vit = backbones.train_world_vit

    def spy(*args, on_step, **kwargs):
        def first_step():  # the thread count the first step runs with
            if not threads_at_start:
                threads_at_start.append(torch.get_num_threads())
            on_step()

        return train_vit(*args, on_step=first_step, **kwargs)

    monkeypatch.setattr(backbones, "train_world_vit", spy)
    torch.set_num_threads(2)
    paths = backbones.ensure_backbones("simple", cache_dir=tmp_path, fast=True, llm="t5", side_by_side=True)
    assert threads_at_start == [1] and torch.get_num_threads() == 2
    assert json.loads((Path(paths["llm_dir"]) / "settings.txt").read_text())["kind"] == "t5"
    language = LanguageBridge.from_pretrained(paths["llm_dir"])
    assert language.end_of_text == "eos" and language.is_encoder_decoder
    # the ViT is keyed apart from the LM: the OPT variant reuses it
    vit_dirs = [p for p in tmp_path.iterdir() if p.name.startswith("vit-")]
    backbones.ensure_backbones("simple", cache_dir=tmp_path, fast=True, llm="opt")
    assert [p for p in tmp_path.iterdir() if p.name.startswith("vit-")] == vit_dirs


def test_world_bert_learns_the_masked_words_and_its_tokenizer_covers_the_world(tmp_path):
    out = backbones.train_world_bert("simple", tmp_path / "bert", steps=500, batch_size=32, hidden=32, layers=1,
                                     heads=2, intermediate=64, n_texts=500, lr=5e-3)  # fmt: skip
    info = json.loads((Path(out) / "bert_train_info.txt").read_text())
    assert info["final_loss"] < info["first_loss"] - 1.0
    assert info["masked_word_accuracy"] > 0.3  # against 1 in 70 by chance

    from qformer.demo import check_tokenizer_covers

    world = tmp_path / "world"
    shapes.generate_world(world, level="simple", n_train=40, n_test=10, n_compositional=5, image_size=32, seed=3)
    check_tokenizer_covers(out, world)  # every word of a freshly generated world has its own token
    records = json.loads((world / "train.json").read_text())
    records[0]["caption"] = "a zebra"
    (world / "train.json").write_text(json.dumps(records))
    with pytest.raises(ValueError, match="zebra"):
        check_tokenizer_covers(out, world)


def test_world_bert_stops_when_its_time_budget_runs_out(tmp_path):
    out = backbones.train_world_bert("simple", tmp_path / "bert", steps=100_000, batch_size=8, hidden=32, layers=1,
                                     heads=2, intermediate=64, n_texts=200, time_budget_s=1.0)  # fmt: skip
    info = json.loads((Path(out) / "bert_train_info.txt").read_text())
    assert 0 < info["steps_done"] < 100_000 and info["steps"] == 100_000
    assert info["seconds"] < 5.0
    assert (Path(out) / "config.json").is_file()


def test_epoch_order_keeps_twins_in_one_batch():
    from qformer.world.backbones import epoch_order

    g = torch.Generator().manual_seed(0)
    order = epoch_order(40, g, paired=True)
    assert sorted(order.tolist()) == list(range(40))
    assert (order[0::2] % 2 == 0).all() and (order[1::2] == order[0::2] + 1).all()
    assert order[0::2].tolist() != sorted(order[0::2].tolist())  # shuffled, pairs and all
    plain = epoch_order(40, torch.Generator().manual_seed(0))
    assert sorted(plain.tolist()) == list(range(40)) and not (plain[1::2] == plain[0::2] + 1).all()


def test_train_world_vit_refuses_an_odd_batch_for_twins(tmp_path):
    shapes.generate_world(tmp_path / "w", n_train=8, n_test=0, n_compositional=0, image_size=32, twins=True)
    with pytest.raises(ValueError, match="`batch_size` must be even"):
        backbones.train_world_vit(tmp_path / "w", tmp_path / "out", steps=1, batch_size=3)


def test_vit_trains_on_a_world_kept_in_memory_as_on_its_pngs(tmp_path):
    # `_build_vit`'s path: no PNGs written, the images transformed as they are made
    kwargs = dict(level="full", n_train=12, n_test=3, n_compositional=0, image_size=32, seed=3, twins=True)
    shapes.generate_world(tmp_path / "png", **kwargs)
    kept: dict[str, list] = {"train": [], "test": []}
    transform = backbones.world_transform(21)
    info = shapes.generate_world(tmp_path / "mem", write_images=False,
                                 on_image=lambda split, record, image: kept[split].append((record, transform(image))),
                                 **kwargs)  # fmt: skip
    assert info["images_written"] is False and not (tmp_path / "mem" / "images").exists()
    assert len(kept["train"]) == 12 and len(kept["test"]) == 3
    for split in ("train", "test"):
        records = shapes.load_split(tmp_path / "png", split)
        assert shapes.load_split(tmp_path / "mem", split) == records == [r for r, _ in kept[split]]
    images = torch.stack([x for _, x in kept["train"]])
    assert torch.equal(images, backbones._load_images(tmp_path / "png", shapes.load_split(tmp_path / "png", "train"), 21))
    with pytest.raises(ValueError, match="generated without its images"):
        backbones._load_images(tmp_path / "mem", shapes.load_split(tmp_path / "mem", "train"), 21)

    small = dict(steps=2, batch_size=4, image_size=21, patch_size=7, width=16, layers=1, heads=2, embed_dim=8,
                 text_width=16, text_layers=1, context_length=40, model_name="shapesworld-vit-memtest")  # fmt: skip
    from safetensors.torch import load_file

    _, from_png = backbones.train_world_vit(tmp_path / "png", tmp_path / "a", **small)
    _, from_memory = backbones.train_world_vit(tmp_path / "mem", tmp_path / "b", images=images, **small)
    a, b = load_file(from_png), load_file(from_memory)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"`images` must hold the 12 training images"):
        backbones.train_world_vit(tmp_path / "mem", tmp_path / "c", images=images[:5], **small)
