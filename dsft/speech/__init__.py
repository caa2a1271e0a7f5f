"""Speech input for blsp_kd: BLSP-KD (Wang et al., 2024, "BLSP-KD: Bootstrapping Language-Speech
Pre-training via Knowledge Distillation", arXiv:2405.19041), METHODS.md section 2.

The pieces, each self-contained:
- ``audio``: WAV files -> 16 kHz float samples (resampling other rates), the JSONL speech
  manifest ``{"audio", "transcript", "response"}``, one-line DataErrors.
- ``encoder``: Whisper's encoder + feature extractor (tiny and trainable, or a local pretrained
  directory, frozen) followed by the CIF adapter (``cif``) projecting to the LM's width.
- ``cif``: continuous integrate-and-fire; exactly n tokens per utterance when given the
  transcript's token count n; the quantity loss.
- ``kd``: the distillation losses from the two forwards' logits.

One BLSP-KD training step on a batch of (speech, transcript, response), the language model
frozen (possibly 4-bit) with partial_lora adapters, all in one model:

1. Text sequence (teacher):  [prompt ids] [transcript ids, n tokens] [suffix + response ids]
   Speech sequence (student): the same, with the n transcript embeddings replaced by the n CIF
   outputs ``SpeechEncoder(features, frame_mask, num_tokens=n).embeds`` (``inputs_embeds``).
   Both sequences have the same length and layout, so one set of position masks
   (transcript positions, response positions) serves both.
2. Teacher: ``with torch.no_grad():`` the LM on the text sequence with the partial_lora
   modality mask all zero (``PartialLoraHooks.forward_context({"modality_mask": zeros})``):
   every adapted layer is exactly its base layer, so the teacher is the base LM, independent
   of the LoRA weights.
3. Student: the LM on the speech sequence with the modality mask = the transcript (now speech)
   positions: partial LoRA adapts the LM at the speech tokens only; gradients reach the LoRA,
   the CIF adapter and (tiny recipe) the encoder.
4. Loss: ``kd.blsp_kd_losses(teacher_logits, student_logits, ...)``: input KL at the
   transcript/speech positions + response KL at the response positions (temperature 2,
   KL(teacher || student)) + CIF quantity loss (+ optional response CE), weight 1 each.

At inference (``dsft generate`` with audio) the CIF predicts n = max(1, round(sum alpha)) and the
prompt is [prompt ids] [CIF tokens] [suffix ids] with the modality mask on the CIF tokens.
"""
