"""`python -m pipeline negatives`, its phrase bank, and `sam3.text_similarity`.

Real parts throughout: the demo dataset (built in a temporary folder), the tiny SAM 3 model with random weights
(its embeddings and scores are arbitrary but fixed, so the tests check the rules, not which phrases win), the
built-in bank.
"""

import argparse
import json

import pytest
import torch

from pipeline import negatives
from pipeline.demo_data import build_demo_dataset
from pipeline.negatives import BankRanker, NegativesConfig, build_negatives, name_keys, phrase_scores
from pipeline.phrase_bank import BANK_FILES, load_phrase_bank, read_phrase_file
from sam3.batch import PromptBatch
from sam3.coco import load_coco
from sam3.data.negatives import load_negatives
from sam3.errors import ConfigError, DataError
from sam3.model import load_model
from sam3.text_similarity import PhraseEmbedder, prompt_embeddings
from sam3.tokenizer import attention_mask, clean_text, tokenize

pytestmark = pytest.mark.usefixtures("outside_repo")  # stage flags only, not the repository's params.yaml


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a few shared cores, torch's second thread mostly waits for a busy core: one thread ran these 4x faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    build_demo_dataset(root)
    return root


@pytest.fixture(scope="module")
def model():
    return load_model("tiny")


@pytest.fixture(scope="module")
def embedder(model):
    return PhraseEmbedder(model)  # shared: the bank is embedded once for the whole module


def present_by_image(dataset_dir, split="train"):
    """image id (str) -> names of the categories annotated in it, straight from the COCO file."""
    coco = load_coco(dataset_dir / split / "_annotations.coco.json")
    names = {c["id"]: c["name"] for c in coco["categories"]}
    present = {str(image["id"]): set() for image in coco["images"]}
    for ann in coco["annotations"]:
        present[str(ann["image_id"])].add(names[ann["category_id"]])
    return present, list(names.values())


def run_stage(*argv):
    parser = argparse.ArgumentParser()
    negatives.add_arguments(parser)
    return negatives.run(parser.parse_args([str(a) for a in argv]))


# ---- text similarity -------------------------------------------------------------------------------------------


def test_embedding_is_the_normalised_mean_of_the_real_tokens(model):
    phrases = ["cat", "a red sports car"]
    ids = tokenize(phrases)
    features = model.encode_prompts(ids, attention_mask(ids))
    # "cat" is [start, cat, end]: 3 real tokens; the 29 padding positions must not count
    by_hand = features.tokens[0, :3].mean(dim=0)
    by_hand = by_hand / by_hand.norm()
    embeddings = prompt_embeddings(model, phrases)
    assert embeddings.shape == (2, 64)
    torch.testing.assert_close(embeddings[0], by_hand.detach())
    assert embeddings.norm(dim=1).tolist() == pytest.approx([1.0, 1.0])
    # the same phrase gives the same vector whatever it is batched with
    torch.testing.assert_close(prompt_embeddings(model, ["cat"])[0], embeddings[0])


def test_embedder_caches_and_measures_cosine(model):
    embedder = PhraseEmbedder(model)
    similarity = embedder.similarity(["coin", "nucleus"], ["coin", "nucleus", "coin"])
    assert similarity.shape == (2, 3)
    assert similarity[0, 0] == pytest.approx(1.0) and similarity[1, 1] == pytest.approx(1.0)
    assert similarity[0, 2] == pytest.approx(1.0)
    assert similarity[0, 1] == pytest.approx(similarity[1, 0].item())  # symmetric
    assert set(embedder._cache) == {"coin", "nucleus"}  # each phrase encoded once


# ---- phrase bank ----------------------------------------------------------------------------------------------


def test_phrase_bank_files():
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

    # COCO's 80 names as torchvision lists them (its list also has "N/A" gaps and the background class)
    coco = [c for c in FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"] if c not in ("__background__", "N/A")]
    assert read_phrase_file("coco.txt") == coco
    assert len(read_phrase_file("objects365.txt")) == 378  # 365 names, alternatives split ("cabinet/shelf")
    assert {"cutting board", "chopping board", "cabinet", "shelf"} <= set(read_phrase_file("objects365.txt"))
    lvis = read_phrase_file("lvis.txt")
    assert len(lvis) == len(set(lvis)) == 1203
    assert {"aerosol can", "bat (animal)", "computer monitor", "zucchini"} <= set(lvis)
    bank = load_phrase_bank()
    assert BANK_FILES == ("coco.txt", "objects365.txt", "lvis.txt")
    assert len({clean_text(p) for p in bank}) == len(bank)  # one spelling per cleaned phrase
    assert bank[:80] == tuple(coco)


def test_name_keys_match_case_whitespace_plurals_and_senses():
    def same(a, b):
        return not name_keys(a).isdisjoint(name_keys(b))

    assert same("Coin", " coins ")
    assert same("glass", "glasses")
    assert same("Dining  Table", "dining tables")
    assert same("bat (animal)", "bat")
    assert not same("cat", "car")
    assert not same("nucleus", "nuclei")  # irregular plurals are left to the similarity threshold


# ---- the negatives stage ----------------------------------------------------------------------------------------


def test_absent_fills_up_to_per_image(demo):
    present, categories = present_by_image(demo)
    few = build_negatives(demo, NegativesConfig(per_image=5))
    many = build_negatives(demo, NegativesConfig(per_image=30))
    assert set(few["images"]) == set(many["images"]) == set(present)
    for image_id, names in present.items():
        absent = [c for c in categories if c not in names]  # in category order
        assert len(absent) >= 5  # every demo image lacks at least 5 of the 14 categories
        assert [e["phrase"] for e in many["images"][image_id]] == absent  # 14 - present < 30: all of them
        chosen = [e["phrase"] for e in few["images"][image_id]]
        assert len(chosen) == 5 and set(chosen) <= set(absent)
        assert chosen == [c for c in absent if c in chosen]  # kept in category order
    summary = many["summary"]
    assert summary["images"] == 13 and summary["strategies"] == {"absent": summary["phrases"]}
    sizes = [14 - len(names) for names in present.values()]
    assert summary["per_image"] == {"asked": 30, "min": min(sizes), "mean": sum(sizes) / 13, "max": max(sizes)}
    assert summary["images_below_per_image"] == 13


def test_all_strategies_fill_exactly_and_never_name_a_present_category(demo, model, embedder):
    config = NegativesConfig(split="valid", strategies=("absent", "bank", "mined"), per_image=30, mine_candidates=4)
    config.score_threshold = 0.0  # every candidate fires, so mined fills what bank leaves (nothing, here)
    result = build_negatives(demo, config, model=model, embedder=embedder)
    present, _ = present_by_image(demo, "valid")
    for image_id, entries in result["images"].items():
        assert len(entries) == 30  # 1,379 bank phrases: always enough candidates
        phrases = [clean_text(e["phrase"]) for e in entries]
        assert len(set(phrases)) == 30
        assert not set(phrases) & {clean_text(p) for p in present[image_id]}
        strategies = [e["strategy"] for e in entries]
        assert strategies == sorted(strategies, key=("absent", "bank", "mined").index)  # in the order given
        assert strategies.count("absent") == 14 - len(present[image_id])
    assert result["summary"]["strategies"]["mined"] == 0

    # the strategy is recorded on each phrase: bank fills all 5 slots before mined; mined first takes its 3
    config = NegativesConfig(split="valid", strategies=("bank", "mined"), per_image=5, mine_candidates=3)
    config.score_threshold = 0.0
    result = build_negatives(demo, config, model=model, embedder=embedder)
    for entries in result["images"].values():
        assert [e["strategy"] for e in entries] == ["bank"] * 5
    config.per_image, config.strategies = 5, ("mined", "bank")
    result = build_negatives(demo, config, model=model, embedder=embedder)
    for entries in result["images"].values():
        assert [e["strategy"] for e in entries] == ["mined"] * 3 + ["bank"] * 2
        assert all(0.0 < e["score"] <= 1.0 for e in entries[:3]) and "score" not in entries[3]


def test_same_seed_is_byte_identical_and_the_seed_matters(demo, tmp_path):
    argv = ["--split", "valid", "--strategy", "absent", "mined", "bank", "--model", "tiny", "--per-image", "16"]
    argv += ["--mine-candidates", "2", "--score-threshold", "0", "--device", "cpu"]
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert run_stage(demo, "--out", first, *argv) == 0
    assert run_stage(demo, "--out", second, *argv) == 0
    assert first.read_bytes() == second.read_bytes()
    # the sam3 data reader accepts the file: image id -> phrases in order
    written = json.loads(first.read_text())
    loaded = load_negatives(first)
    assert len(loaded) == 6 and loaded[4] == [e["phrase"] for e in written["images"]["4"]]
    assert {e["strategy"] for entries in written["images"].values() for e in entries} == {"absent", "bank", "mined"}

    # random absent subsets (3 of at least 6 absent) differ between seeds, somewhere
    seeds = [tmp_path / "s0.json", tmp_path / "s1.json"]
    for seed, out in enumerate(seeds):
        run_stage(demo, "--out", out, "--per-image", "3", "--seed", seed)
    assert seeds[0].read_bytes() != seeds[1].read_bytes()


def test_bank_leaves_out_names_and_near_duplicates(demo, model, embedder):
    # Image 1 holds only "nucleus". The bank names two categories in other forms, and "coins" names category "coin".
    bank = ("NUCLEUS", "nucleuses", "coins", "a nucleus", "cell", "tree", "car", "dog", "bat (animal)")
    _, categories = present_by_image(demo)
    ranker = BankRanker(bank, categories, embedder)
    assert ranker.phrases == ["a nucleus", "cell", "tree", "car", "dog", "bat (animal)"] and ranker.removed == 3

    # No near-duplicate at threshold 1: every phrase, by cosine to "nucleus", highest first
    cosine = {p: embedder.similarity([p], ["nucleus"]).item() for p in ranker.phrases}
    by_similarity = sorted(ranker.phrases, key=lambda p: -cosine[p])
    assert ranker.ranked(("nucleus",), threshold=1.0) == by_similarity

    # Construct the near-duplicate: a threshold between the nearest and the second nearest phrase
    nearest, second = by_similarity[0], by_similarity[1]
    threshold = (cosine[nearest] + cosine[second]) / 2
    assert ranker.ranked(("nucleus",), threshold) == by_similarity[1:]
    config = NegativesConfig(strategies=("bank",), per_image=3, similarity_threshold=threshold)
    result = build_negatives(demo, config, model=model, bank=bank, embedder=embedder)
    assert [e["phrase"] for e in result["images"]["1"]] == by_similarity[1:4]
    assert all(e["strategy"] == "bank" for e in result["images"]["1"])


def test_mined_keeps_only_phrases_scoring_above_the_threshold(demo, model, embedder):
    config = NegativesConfig(split="valid", strategies=("mined",), per_image=100, mine_candidates=5)
    config.score_threshold = 0.0  # every score is > 0: all candidates kept
    everything = build_negatives(demo, config, model=model, embedder=embedder)
    _, categories = present_by_image(demo, "valid")
    ranker = BankRanker(load_phrase_bank(), categories, embedder)
    present, _ = present_by_image(demo, "valid")
    scores = {}
    for image_id, entries in everything["images"].items():
        candidates = ranker.ranked(tuple(c for c in categories if c in present[image_id]), 0.9)[:5]
        assert sorted(e["phrase"] for e in entries) == sorted(candidates)
        assert [e["score"] for e in entries] == sorted((e["score"] for e in entries), reverse=True)
        scores.update({(image_id, e["phrase"]): e["score"] for e in entries})
    assert everything["summary"]["mined_candidates_scored"] == 6 * 5

    config.score_threshold = 1.01  # a score is at most 1
    assert build_negatives(demo, config, model=model, embedder=embedder)["summary"]["phrases"] == 0

    # about half are kept: a threshold halfway between the two middle scores, so float32 noise between the two runs
    # (their decoder batches differ) cannot move a score across it
    ordered = sorted(scores.values())
    lower, upper = ordered[len(ordered) // 2 - 1], ordered[len(ordered) // 2]
    assert upper - lower > 1e-5
    config.score_threshold = (lower + upper) / 2
    some = build_negatives(demo, config, model=model, embedder=embedder)
    kept = {(image_id, e["phrase"]) for image_id, entries in some["images"].items() for e in entries}
    assert kept == {key for key, score in scores.items() if score > config.score_threshold}
    assert 0 < len(kept) < len(scores)


def test_phrase_score_is_the_max_of_sigmoid_logit_times_sigmoid_presence(demo, model):
    image = negatives.load_val_image(demo / "valid" / "voc_centre.png", 0, 224)
    phrases = [f"phrase {i}" for i in range(17)]  # two decoder chunks: 16 + 1
    scores = phrase_scores(model, image, phrases)
    # by hand for the first phrase of each chunk, through the model's forward on one PromptBatch (no chunks)
    ids = tokenize(["phrase 0", "phrase 16"])
    batch = PromptBatch(
        pixel_values=image.unsqueeze(0),
        input_ids=ids,
        attention_mask=attention_mask(ids),
        query_image=torch.tensor([0, 0]),
        query_prompt=torch.tensor([0, 1]),
        targets=[{}, {}],
    )
    with torch.no_grad():
        out = model(batch)
    by_hand = (out["pred_logits"].sigmoid() * out["presence_logits"].sigmoid()[:, None]).max(dim=1).values
    assert [scores[0], scores[16]] == pytest.approx(by_hand.tolist(), abs=1e-6)
    assert image.shape == (3, 224, 224) and image.min() >= -1 and image.max() <= 1  # warped to 224, mean = std = 0.5


def test_user_errors(demo, tmp_path):
    with pytest.raises(ConfigError, match="needs a model"):
        build_negatives(demo, NegativesConfig(strategies=("bank",)))
    with pytest.raises(ConfigError, match="given twice"):
        build_negatives(demo, NegativesConfig(strategies=("absent", "absent")))
    with pytest.raises(ConfigError, match="per_image"):
        build_negatives(demo, NegativesConfig(per_image=-1))
    with pytest.raises(DataError, match="split 'tain' not found; this dataset has train, valid, test"):
        build_negatives(demo, NegativesConfig(split="tain"))
    with pytest.raises(DataError, match="dataset folder does not exist"):
        build_negatives(tmp_path / "missing", NegativesConfig())
