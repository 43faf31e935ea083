"""Prompt templates and question lists, word for word as in the original (spec data-eval.md §1, §3).

Every template is a plain format string with `{image}` (the image run), `{region}` (a region's image run)
and field names; collators take a `prompts` dict in their config to override any of them by name.
The original's quirks (two spaces after "ASSISTANT:" in training, "anwser", "asistant", "attibuts") are
kept by default because released checkpoints were trained on them; docs/data.md lists them.
"""

from __future__ import annotations

SYSTEM = "You are a helpful assistant.\n\n"
SYSTEM_CAPTION_EVAL = "You are a helpful assistant. \n\n"


def assemble(system: str, user: str, assistant: str) -> str:
    """The original's prompt assembly: `strip(system + " " + user + " " + assistant)`."""
    return (system + " " + user + " " + assistant).strip()


CAPTION_QUESTIONS = (
    "Briefly describe this image.",
    "Provide a concise depiction of this image.",
    "Present a short description of this image.",
    "Summarize this image in a few words.",
    "A short image caption:",
    "A short image description:",
    "A photo of ",
    "An image that shows ",
    "Write a short description for the image. ",
    "Write a description for the photo.",
    "Provide a description of what is presented in the photo.",
    "Briefly describe the content of the image.",
    "Can you briefly explain what you see in the image?",
    "Could you use a few words to describe what you perceive in the photo?",
    "Please provide a short depiction of the picture.",
    "Using language, provide a short account of the image.",
    "Use a few words to illustrate what is happening in the picture.",
)

IMAGE_QUESTIONS = (
    "please reconstruct the complete image from the description and the image to be filled in",
    "can you restore the complete image based on the description and the existing parts of the image",
    "Could you recreate the full image from the provided image description and the incomplete image?",
    "What would the full image look like, given the description and the parts of the image provided?",
    "Based on your understanding of the image description and the available sections of the image, could you "
    "restore it?",
    "Please complete the picture based on what's described and what's already there in the picture.",
    "Can you give a reconstruction of the complete image based on the description and the available parts?",
    "Could you combine the description with the existing elements of the image to create a full image?",
    "Using the provided description and the parts of the image, can you reconstruct the full image?",
    "Can you recreate the key aspects of the image based on the description and the partial image?",
    "What would the full image look like, considering the described features and the incomplete image provided?",
    "Please recreate the image using the description and the partial image as a guide.",
    "Can you reconstruct the overall theme or concept captured in the image based on the description and the "
    "partial image?",
    "How would you recreate the image's composition and focus based on the provided description and image "
    "fragments?",
    "What would the full image look like, considering the focal point or main subject described and the parts "
    "of the image available?",
    "Considering the interactions of the different components described, how would you restore the full image?",
    "Based on the fitting caption provided, how would you recreate the full image from the existing parts?",
    "Can you create a complete image that captures the essence of the description and fills in the incomplete "
    "parts?",
    "How would you recreate the full image based on the description summarizing the content in a phrase or "
    "sentence?",
    "Please provide a reconstruction of the complete image based on the catchy and relevant caption and the "
    "partial image.",
    "If you were to give this image a title, how would you complete the picture based on it and the available "
    "parts?",
    "Considering the creative sentence describing the image, can you reconstruct the complete image?",
    "Please suggest a way to restore the complete image based on the memorable phrase encapsulating the image's "
    "content.",
    "What would the complete image look like based on the engaging phrase provided and the incomplete image?",
    "Can you create a full image that highlights the main theme based on the description and the existing parts "
    "of the image?",
    "How would you recreate the complete image to match the caption summarizing the image's story?",
    "Provide a reconstruction of the complete image that conveys the core message described in the catchy "
    "caption.",
    "If you were to give this image a headline, how would you reconstruct the full image from it and the "
    "available parts?",
    "Can you craft a full image that communicates the essence based on the description and the partial image?",
    "How would you reconstruct the complete image based on the powerful caption describing the image's content?",
    "Please provide a restoration of the full image based on the inventive title summarizing the scene depicted "
    "in the partial image.",
    "Compose a full image that reflects the key elements described in the concise and striking phrase.",
    "If you were to create a caption for this image, how would you complete the picture based on it and the "
    "available parts?",
    "Offer a complete image that highlights the central focus described in the compelling caption.",
    "Can you produce a full image that encapsulates the overall mood described and fills in the incomplete parts?",
    "Please generate a full image that would best illustrate the events captured in the description and the "
    "partial image",
    "How would you express the main idea of the full image based on the impactful sentence and the partial "
    "image?",
    "Please create a complete picture that conveys the essence of the description and the existing parts of the "
    "picture.",
    "Compose a full image that reflects the most striking features described in the imaginative caption.",
    "What would the full image look like based on the memorable statement representing the scene illustrated and "
    "the incomplete image?",
    "Draft a complete image that brings the description to life for the viewer.",
    "Can you suggest a full image that highlights the underlying message described and fills in the incomplete "
    "parts?",
    "What would the complete image look like based on the engaging phrase conveying the action or subject matter "
    "depicted and the partial image?",
    "How would you encapsulate the core theme of the full image in a concise and expressive manner based on the "
    "description and the incomplete image?",
    "Please provide a full image that captures the spirit of the description and the partial image.",
    "Craft a complete image that showcases the most prominent attributes described in the captivating caption.",
    "What would the complete image look like based on the intriguing statement summing up the scene presented "
    "and the partial image?",
    "Develop a full image that paints a vivid picture for the viewer based on the descriptive caption and the "
    "available parts of the image.",
    "Can you give a detailed account of what the full image would look like based on the image's content "
    "description?",
    "What would the complete image look like considering the key elements and features described and the parts "
    "of the image visible?",
    "How would you recreate the events or actions depicted in the full picture based on the narration and the "
    "incomplete picture?",
    "Please share your reconstruction of the full image considering the various components described and present "
    "in the partial image.",
    "What would the complete image look like, considering the overall theme or concept captured in the "
    "description and the parts of the image available? Can you create it?",
)

VG_QUESTIONS = (
    "Give me a short description of <region>.",
    "Can you give me a short description of <region>?",
    "Can you provide me with a short description of the region in the picture marked by <region>?",
    "I'm curious about the region represented by <region> in the picture. Could you describe it in few words?",
    "What can you tell me about the region indicated by <region> in the image in few words?",
    "I'd like to know more about the area in the photo labeled <region>. Can you give me a concise description?",
    "Could you describe the region shown as <region> in the picture concisely?",
    "What can you give me about the region outlined by <region> in the photo?",
    "Please provide me with a brief description of the region marked with <region> in the image.",
    "Can you give me a brief introduction of the region labeled as <region> in the picture?",
    "I'm interested in knowing the region represented by <region> in the photo. Can you describe it in several "
    "words?",
    "What is the region outlined by <region> in the picture like? Could you give me a streamlined description?",
    "Can you provide me with a brief description of the region in the picture marked by <region>, please?",
    "I'm curious about the region represented by <region> in the picture. Could you describe it in few words, "
    "please?",
    "What can you tell me about the region indicated by <region> in the image?",
    "I'd like to know more about the area in the photo labeled <region>, please. Can you give me a simple "
    "description?",
    "Could you describe the region shown as <region> in the picture in several words?",
    "Please provide me with a simple description of the region marked with <region> in the image, please.",
    "I'm interested in learning more about the region represented by <region> in the photo. Can you describe it "
    "in few words, please?",
    "What is the region outlined by <region> in the picture like, please? Could you give me a simple and clear "
    "description?",
    "Please describe the region <region> in the image concisely.",
    "Can you offer a simple analysis of the region <region> in the image?",
    "Could tell me something about the region highlighted by <region> in the picture briefly?",
    "Can you share a simple rundown of the region denoted by <region> in the presented image?",
)
VG_ANSWER_SUFFIX = " Answer the question using a short phrase."

_ONE_REGION = (
    "I will provide you with only one region containing only one object, although there may be other objects "
    "present in the image. "
)
REFCOCO_PREAMBLE = (
    _ONE_REGION + "It is recommended that you describe the object's relative position with respect to other "
    "objects in the image, as well as its position within the image and its basic attributes."
)
REFCOCOP_PREAMBLE = (
    _ONE_REGION + "It is recommended that you describe the object's relative position with respect to other "
    "objects in the image and its basic attibuts, you should not give its position within the image."
)
COCO_MASK_PREAMBLE = (
    "In the conversation below, you simply answer the category name based on what you see in the imagery inside "
    "a particular region. I will give you only one region each time.\n"
)
VG_MASK_PREAMBLE = "This provides an overview of the picture.\n"
PARTIMAGENET_CLASSES = ("Bottle", "Biped", "Quadruped", "Fish", "Reptile", "Bicycle", "Bird", "Car", "Boat",
                        "Snake", "Aeroplane")
PARTIMAGENET_PARTS = ("Tier", "Hand", "Wing", "Mouth", "Tail", "Side", "Fin", "Engine", "Foot", "Head", "Body",
                      "Sail", "Seat")
PASCAL_CLASSES = ("potted plant", "aeroplane", "cow", "cat", "bus", "horse", "car", "dog", "bicycle", "person",
                  "bird", "bottle", "sheep", "motorbike")
PASCAL_PARTS = ("eye", "window", "cap", "headlight", "hand", "mirror", "arm", "plant", "wheel", "ear", "pot",
                "foot", "leg", "nose", "body", "horn", "handlebar", "neck", "license plate", "paw", "saddle",
                "head", "muzzle", "tail", "wing", "beak", "hair", "torso", "door", "mouth")


def _part_preamble(answer_format: str, classes: tuple[str, ...], parts: tuple[str, ...], lead: str = "") -> str:
    # "based on what you seein the image" (missing space) is in the original and kept
    return (
        lead + "In the conversation below, you simply answer the category and subcategory name based on what you "
        "seein the image inside a particular region. It maybe a subpart of an object. I will give you only one "
        f"region each time. Your answer should in the format of {answer_format}. "
        "Categories Containing " + ", ".join(classes) + ". Subcategories Containing " + ",".join(parts) + ".\n"
    )


PARTIMAGENET_PREAMBLE = _part_preamble("category subcategory", PARTIMAGENET_CLASSES, PARTIMAGENET_PARTS)
PASCAL_PREAMBLE = _part_preamble("category:subcategory", PASCAL_CLASSES, PASCAL_PARTS, lead=" ")

GROUNDING_REGION_USER = (
    "## USER: {image} \n " + _ONE_REGION + "It is recommended that you describe the object's relative position "
    "with respect to other objects in the image and its basic attibuts, you should not give its position within "
    "the image. {region}. \n"
)

# Every template set a collator uses; override any entry through the collator config's `prompts` dict.
DEFAULT_PROMPTS: dict[str, str] = {
    "system": SYSTEM,
    "system_caption_eval": SYSTEM_CAPTION_EVAL,
    # caption SFT (1.2)
    "caption_user": "## USER: {image}{question} \n",
    "caption_assistant": "## ASSISTANT:  A photo of",
    "caption_completion": " {caption}</s>",
    "t2i_user": "## USER: {question}{caption} \n",
    "t2i_assistant": "## ASSISTANT: ",
    "t2i_completion": " {image}</s>",
    # VQA SFT (1.3)
    "vqa_user": "## USER: Based on the image, please answer the question. {image}{question}\n",
    "vqa_assistant": "## ASSISTANT:  The answer is",
    "vqa_completion": " {answer}</s>",
    # region captioning and box grounding (1.4)
    "region_user": GROUNDING_REGION_USER,
    "region_assistant": "## ASSISTANT:",
    "region_completion": " {sentence}</s>",
    "box_user": "## USER: {image} Provide the bounding box coordinate of the region this sentence describes: "
                "{sentence}. \n",
    "box_assistant": "## ASSISTANT: the bounding box coordinate is",
    "box_completion": " <box>{box}</box></s>",
    # mask referring conversations (1.5)
    "conv_user_role": "user",
    "conv_assistant_role": "asistant",
    # caption eval (3.2)
    "caption_eval_user": "## USER: {image} Could you provide a short description of the image? \n",
    "caption_eval_assistant": "## ASSISTANT: A photo of",
    "paragraph_eval_user": "## USER: {image} Please describe the image in detail. \n",
    "paragraph_eval_assistant": "## ASSISTANT: The image depicts ",
    # VQA eval
    "vqa_eval_user": "## USER: Based on the image, please answer the question. {image}{question} Please provide an "
                     "accurate answer within one word.\n",
    "vizwiz_eval_user": "## USER: Based on the image, please answer the question. {image}{question} When the "
                        "provided information is insufficient, respond with 'Unanswerable'. Please provide an "
                        "accurate answer within one word.\n",
    "vqa_eval_assistant": "## ASSISTANT: The answer is",
    # yes/no (POPE, RobustVQA) and multiple choice (MMVP)
    "yesno_eval_user": "## USER: Based on the image, please answer the question. {image}{question} \n",
    "yesno_eval_assistant": "## ASSISTANT: The answer is",
    "pope_question": "{text} Please anwser yes or no",
    "robust_question": "Is {label} the main object in this image? Please anwser yes or no",
    "mmvp_question": "{question} Options: {options} Answer with the option's letter.",
    # grounding eval
    "grounding_eval_user": "## USER: {image} Provide the bounding box coordinate of the region this sentence "
                           "describes: {sentence}. \n",
    "grounding_eval_assistant": "## ASSISTANT: the bounding box coordinate is <box>",
    # mask referring eval (prompt ends at the assistant tag, no EOS: see docs/data.md)
    "referring_eval_preamble": "\nI will provide you with only one region containing only one object, although "
                               "there may be other objects present in the image. you should describe the object's "
                               "relative position with respect to other objects in the image, as well as its "
                               "position within the image and its basic attributes.",
    # VisDial
    "visdial_context": "You are a helpful assistant.\n\n  ## USER: {image} caption: {caption}. ",
    "visdial_round": "question: {question}? answer: {answer}. ",
    "visdial_final": "question: {question}? \n ## ASSISTANT: the answer is",
}


def merged_prompts(overrides: dict[str, str] | None) -> dict[str, str]:
    """Defaults with `overrides` applied; unknown names are an error (typos must not pass silently)."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(DEFAULT_PROMPTS))
    if unknown:
        raise KeyError(f"unknown prompt names {unknown}; known: {sorted(DEFAULT_PROMPTS)}")
    return {**DEFAULT_PROMPTS, **overrides}
