"""Our model and tokenizer against what the original THUDM/chatglm-6b code computed (tests/fixtures/reference)."""
import os

import pytest
import torch

from chatglm_6b.modeling_chatglm import ChatGLMForConditionalGeneration
from conftest import REFERENCE

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model():
    return ChatGLMForConditionalGeneration.from_pretrained(os.path.join(REFERENCE, "tiny-chatglm"),
                                                           dtype=torch.float32).eval()


def test_tokenizer_matches_original(reference, reference_tokenizer):
    for case in reference["tokenizer"]:
        assert reference_tokenizer.tokenize(case["text"]) == case["tokens"], case["text"]
        ids = reference_tokenizer.encode(case["text"])
        assert ids == case["input_ids"], case["text"]
        assert reference_tokenizer.decode(ids) == case["decoded"], case["text"]


@pytest.mark.parametrize("name", ["short", "history", "code"])
def test_forward_logits_match_original(model, reference, reference_tokenizer, name):
    case = reference["forward"][name]
    inputs = reference_tokenizer([case["text"]], return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == case["input_ids"]
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    torch.testing.assert_close(logits[-1], torch.tensor(case["last_logits"]), atol=TOLERANCE, rtol=0)
    top = logits.topk(5)
    assert top.indices.tolist() == case["top5_ids"]
    torch.testing.assert_close(top.values, torch.tensor(case["top5_values"]), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", ["short", "history", "code"])
def test_greedy_generate_matches_original(model, reference, name):
    input_ids = torch.tensor([reference["forward"][name]["input_ids"]])
    output = model.generate(input_ids, max_length=input_ids.shape[1] + 24, do_sample=False)
    assert output[0].tolist() == reference["greedy"][name]


def test_chat_matches_original(model, reference, reference_tokenizer):
    for case in reference["chat"]:
        history = [tuple(turn) for turn in case["history"]]
        response, new_history = model.chat(reference_tokenizer, case["query"], history, do_sample=False, max_length=128)
        assert response == case["response"]
        assert [list(turn) for turn in new_history] == case["new_history"]


def test_padded_batch_matches_original(model, reference, reference_tokenizer):
    batch = reference["batch"]
    inputs = reference_tokenizer(batch["texts"], padding=True, return_tensors="pt")
    assert inputs["input_ids"].tolist() == batch["input_ids"]
    assert inputs["attention_mask"].tolist() == batch["attention_mask"]
    assert inputs["position_ids"].tolist() == batch["position_ids"]
    output = model.generate(**inputs, max_length=inputs["input_ids"].shape[1] + 16, do_sample=False)
    assert output.tolist() == batch["greedy"]
    new_tokens = output[:, inputs["input_ids"].shape[1]:].tolist()
    assert reference_tokenizer.batch_decode(new_tokens) == batch["decoded"]


def test_ptuning_logits_match_original(reference):
    model = ChatGLMForConditionalGeneration.from_pretrained(os.path.join(REFERENCE, "tiny-chatglm-ptuning"),
                                                            dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([reference["ptuning"]["input_ids"]])).logits[0, -1]
    torch.testing.assert_close(logits, torch.tensor(reference["ptuning"]["last_logits"]), atol=TOLERANCE, rtol=0)
