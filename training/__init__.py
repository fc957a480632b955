"""The jobs that build the models, run from the checkout (`python cli.py train-encoder | eval-encoder |
build-instructions | finetune | convert-pulse | train-segmenter`, or `torchrun training/<recipe>.py`); they
import `rag_ecg`, never the other way round.

Shared by the recipes
    common.py               DDP process group, RNG state, torch thread guard, metrics log, saved config

Contrastive ECG encoder (`train_encoder.py` is the recipe: setup -> train_epoch -> finalize)
    encoder_config.py       EncoderTrainConfig + load_config (YAML + overrides)
    encoder_data.py         cases from the store, pages rendered afresh per (epoch, record), epoch batches
    encoder_objective.py    CLIP + superclass head module, loss, AdamW groups, LR schedule, autocast
    encoder_checkpoint.py   run_dir/last: resumable optimizer/scheduler/RNG state
    train_encoder.py        the recipe, quick validation, `main`, `evaluate_checkpoint` (eval-encoder)

Trace segmenter (`train_segmenter.py` is the recipe; `--export` writes rag_ecg/paper/weights/)
    segmenter_config.py     SegmenterTrainConfig + load_config (YAML + overrides)
    segmenter_data.py       PTB-XL folds 1-8 drawn under every preset with pixel-exact pen masks, crops of them
    train_segmenter.py      BCE + dice on crops, resumable run_dir/last, F1 vs the ink map, export

Instruction data for the LLM fine-tune (`build_instructions.py` is the job)
    instruction_config.py   InstructionConfig (task families, evidence share, renders, splits)
    instruction_cases.py    cases as plain records, SCP vocabulary, one rendered page per case
    instruction_tasks.py    question families and phrasing, answers from the case's own labels
    instruction_evidence.py retrieved-case evidence (index or encoder) that never leaks the answer
    build_instructions.py   writes train/val JSONL, images and the manifest

LoRA fine-tune of LLaVA-NeXT / PULSE-7B (`finetune_llm.py` is the recipe: setup -> train_epoch -> finalize)
    finetune_config.py      FinetuneConfig + load_config (checked paths and choices)
    llm_data.py             conversations -> tokens with answer-only labels, dataset, collate, batches
    llm_model.py            processor, base model (4/8-bit), LoRA, answer-token loss, merge_adapter
    llm_checkpoint.py       resumable checkpoints (adapter, optimizer, scheduler, every rank's RNG)
    finetune_llm.py         the recipe, validation loss, `main`

PULSE-7B plumbing
    chat_template.py        the vicuna ("llava_v1") chat template PULSE was trained with (one copy)
    convert_pulse.py        LLaVA-repo checkpoint -> Hugging Face LLaVA-NeXT layout (what vLLM serves)
    tiny_llava.py           a tiny random-init LLaVA-NeXT built offline (tests, CPU smoke runs)
    serve_pulse.sh          vLLM's OpenAI-compatible server for the converted model
"""
