# The program from shared/seed/embedding-finetuning-guide.md, steps 1-6, as a user would write it.
# Changes from the guide, and only these:
#   - the import line: unsloth -> embedtune;
#   - BASE_MODEL_ID / MAX_SEQ_LENGTH / the dataset path come from the environment ("replace as needed");
#   - CPU-friendly precision (fp16/bf16/tf32/fp16_full_eval off) and report_to="none".
import os
os.environ["UNSLOTH_DISABLE_FAST_GENERATION"] = "1"

import embedtune
from embedtune import FastModel

from transformers import BertModel

BASE_MODEL_ID = os.environ["GUIDE_BASE_MODEL_ID"]  # replace as needed
MAX_SEQ_LENGTH = int(os.environ.get("GUIDE_MAX_SEQ_LENGTH", "2048"))

model, tokenizer = FastModel.from_pretrained(
    model_name      = BASE_MODEL_ID,
    auto_model      = BertModel,
    max_seq_length  = MAX_SEQ_LENGTH,
    dtype           = None,
    add_pooling_layer = False,
)

from peft import TaskType

model = FastModel.get_peft_model(
    model,
    r=8,
    lora_alpha=8,
    lora_dropout=0.0,
    target_modules=["query", "key", "value", "dense"],
    bias="none",
    use_gradient_checkpointing="unsloth",
    task_type=TaskType.FEATURE_EXTRACTION,
)

import sentence_transformers
from sentence_transformers import SentenceTransformer

def get_st_unsloth_wrapper(
    model,
    tokenizer,
    base_model_id=BASE_MODEL_ID,
    pooling_mode="cls",
    max_seq_length=MAX_SEQ_LENGTH,
):
    transformer_module = sentence_transformers.models.Transformer(
        model_name_or_path=base_model_id,
        max_seq_length=max_seq_length,
    )
    transformer_module.auto_model = model
    transformer_module.tokenizer = tokenizer

    hidden_size = model.config.hidden_size
    pooling_module = sentence_transformers.models.Pooling(
        word_embedding_dimension=hidden_size,
        pooling_mode=pooling_mode,
    )
    normalize_module = sentence_transformers.models.Normalize()
    return SentenceTransformer(modules=[transformer_module, pooling_module, normalize_module])

sbert_model = get_st_unsloth_wrapper(model, tokenizer)

from datasets import load_dataset, concatenate_datasets
from sentence_transformers.losses import MultipleNegativesRankingLoss
from sentence_transformers.util import cos_sim
from sentence_transformers.training_args import BatchSamplers
from sentence_transformers.evaluation import InformationRetrievalEvaluator
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
import torch

loss = MultipleNegativesRankingLoss(sbert_model)

dataset = load_dataset("json", data_files=os.environ["GUIDE_DATASET"], split="train")
dataset = dataset.map(lambda x, idx: {"id": str(idx)}, with_indices=True)
dataset = dataset.shuffle(seed=42)

split_dataset = dataset.train_test_split(test_size=int(os.environ.get("GUIDE_TEST_SIZE", "4096")), seed=42)
train_dataset = split_dataset["train"]
validation_dataset = split_dataset["test"]

corpus_dataset = concatenate_datasets([train_dataset, validation_dataset])
corpus = dict(zip(corpus_dataset["id"], corpus_dataset["positive"]))
queries = dict(zip(validation_dataset["id"], validation_dataset["anchor"]))
relevant_docs = {qid: [qid] for qid in queries}

evaluator = InformationRetrievalEvaluator(
    queries=queries,
    corpus=corpus,
    relevant_docs=relevant_docs,
    score_functions={"cosine": cos_sim},
    name="ir-eval",
)

args = SentenceTransformerTrainingArguments(
    output_dir="embeddings_run",
    num_train_epochs=1,
    per_device_train_batch_size=8,
    per_device_eval_batch_size=1024,
    gradient_accumulation_steps=1,
    learning_rate=2e-5,
    lr_scheduler_type="constant_with_warmup",
    warmup_ratio=0.1,
    weight_decay=0.01,
    optim="adamw_torch_fused",
    batch_sampler=BatchSamplers.NO_DUPLICATES,
    fp16=False,
    bf16=False,
    tf32=False,
    fp16_full_eval=False,
    eval_strategy="steps",
    eval_steps=1000,
    save_strategy="steps",
    save_steps=1000,
    save_total_limit=20,
    metric_for_best_model="eval_ir-eval_cosine_ndcg@10",
    greater_is_better=True,
    logging_steps=10,
    report_to="none",
    run_name=f"{BASE_MODEL_ID.split('/')[-1]}-st-finetune",
    seed=42,
    max_grad_norm=1.0,
)

trainer = SentenceTransformerTrainer(
    model=sbert_model,
    args=args,
    train_dataset=train_dataset.select_columns(["anchor", "positive"]),
    eval_dataset=validation_dataset.select_columns(["anchor", "positive"]),
    loss=loss,
    evaluator=evaluator,
)

trainer.train()

# Merge LoRA weights into the base encoder in-place
model.merge_and_unload()

# `sbert_model` now contains merged encoder + pooling/normalize heads
sbert_model.save_pretrained("embeddings_merged")

model.save_pretrained("embeddings_merged_hf")
tokenizer.save_pretrained("embeddings_merged_hf")
