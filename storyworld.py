"""StoryWorld: the embedded default data set, a small world of children's stories in English and Chinese.

Everything is generated from a seed, offline, in a few seconds:
  * stories for pretraining (`generate_stories`),
  * question-answer chats about stories for supervised fine-tuning (`generate_chats`),
  * preference pairs, a correct and a wrong answer, for DPO (`generate_preference_pairs`).

A story is one of a dozen story shapes, each a list of steps with alternative phrasings, filled with entities
drawn from the pools below (names, pets, objects and colours, places, foods, ...), plus a few random connective
sentences. The random entities make a corpus that a model must learn the language and the story logic of, rather
than the stories by heart. Every story also records its facts (who the hero is, what was found, ...), so each
later stage has a measurable target: the answer to a question about a story is a fixed sentence whose key words
are copied from the story, scored by exact match (`evals.answer_matches`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import NamedTuple

from fileio import write_jsonl

# ---------------------------------------------------------------------------------------------------------------
# Entity pools. No entry mentions another entry of its pool (see `mentions`; a test checks it), so whether a
# story mentions an entity is a plain text search.

EN_GIRLS = ("Lily Mia Emma Anna Lucy Sara Zoe Ella Amy Rose Kate Nora Ruby Ivy Grace Chloe Molly Daisy Hannah "
            "Julia Sophie Alice").split()
EN_BOYS = ("Tom Ben Sam Leo Jack Tim Finn Noah Owen Luke Jake Eli Adam Ryan Kevin Peter Oscar Henry Theo Dan Joe "
           "Charlie").split()
ZH_GIRLS = ("小红 小丽 小芳 小美 小兰 小燕 小月 红红 甜甜 圆圆 婷婷 静静 佳佳 朵朵 "
            "贝贝 可可 小雨 小云 欢欢 丽丽 娜娜").split()
ZH_BOYS = ("小明 小华 小刚 小军 小林 小强 小杰 小东 小飞 小龙 明明 亮亮 丁丁 冬冬 "
           "乐乐 果果 宁宁 阳阳 安安 壮壮 浩浩").split()

# Places with the preposition that says "there": found in the park, at the beach, on the farm.
EN_PLACES = {"the park": "in the park", "the garden": "in the garden", "the beach": "at the beach",
             "the forest": "in the forest", "the farm": "on the farm", "the lake": "by the lake",
             "the zoo": "at the zoo", "the library": "in the library", "the market": "at the market",
             "the playground": "at the playground", "the river": "by the river", "the hill": "on the hill",
             "the pond": "by the pond", "the meadow": "in the meadow"}
EN = {
    "names": EN_GIRLS + EN_BOYS,
    "pets": ("Spot Buddy Fluffy Patch Coco Pip Whiskers Biscuit Pepper Nibbles Ginger Peanut Button Rusty Dotty "
             "Fuzzy Bean Pebble").split(),
    "animals": "dog cat rabbit bird fish turtle duck hamster frog pony goat mouse".split(),
    "objects": ["ball", "kite", "hat", "book", "cup", "box", "umbrella", "boat", "shell", "key", "balloon", "scarf",
                "bag", "sock", "bucket", "drum", "crayon", "ribbon", "bell", "blanket", "teddy bear", "toy car"],
    "colours": "red blue green yellow pink purple orange white black brown gray".split(),
    "places": list(EN_PLACES),
    "foods": ["apples", "cookies", "cake", "bread", "bananas", "carrots", "pancakes", "ice cream", "rice", "noodles",
              "grapes", "strawberries", "cheese", "pie", "sandwiches", "cherries", "popcorn", "soup"],
    "weathers": "sunny warm windy cloudy cool hot cold bright".split(),
    "feelings": "happy proud glad excited calm thankful brave cheerful surprised safe joyful relieved".split(),
    "helpers": ["Mom", "Dad", "Grandma", "Grandpa", "Auntie Sue", "Uncle Bob", "Miss Lane", "Mr Parker"],
    "actions": ["played tag", "played hide and seek", "drew pictures", "sang songs", "built a sand castle",
                "rode their bikes", "jumped rope", "danced in a circle", "played a clapping game",
                "made a little house of sticks", "looked for bugs", "ran races"],
    "fears": ["the dark", "thunder", "the big slide", "deep water", "loud noises", "the tall ladder", "spiders",
              "the vacuum cleaner"],
    "spots": ["under a bench", "behind a tree", "under a bush", "next to a rock", "in the tall grass"],
    "openers": ["", "One day, ", "Once upon a time, ", "After school, ", "On Saturday, ", "Early in the morning, ",
                "One afternoon, "],
}
# Chinese objects, animals and places carry what their grammar needs: a measure word (一个皮球, 一只小狗) or the
# place with its locative (在公园里, 在海边).
ZH_OBJECTS = {"皮球": "个", "风筝": "只", "帽子": "顶", "故事书": "本", "杯子": "个", "盒子": "个", "雨伞": "把",
              "小船": "条", "贝壳": "个", "钥匙": "把", "气球": "个", "围巾": "条", "书包": "个", "袜子": "只",
              "小桶": "个", "蜡笔": "支", "丝带": "条", "铃铛": "个", "毯子": "条", "玩具熊": "只", "玩具车": "辆",
              "羽毛": "根"}
ZH_ANIMALS = {"小狗": "只", "小猫": "只", "小兔子": "只", "小鸟": "只", "小鱼": "条", "小乌龟": "只", "小鸭子": "只",
              "小仓鼠": "只", "小青蛙": "只", "小马": "匹", "小山羊": "只", "小老鼠": "只"}
ZH_PLACES = {"公园": "公园里", "花园": "花园里", "海边": "海边", "森林": "森林里", "农场": "农场里", "湖边": "湖边",
             "动物园": "动物园里", "图书馆": "图书馆里", "市场": "市场里", "操场": "操场上", "河边": "河边",
             "小山": "小山上", "池塘边": "池塘边", "草地": "草地上"}
ZH = {
    "names": ZH_GIRLS + ZH_BOYS,
    "pets": "豆豆 球球 毛毛 花花 点点 咪咪 旺财 雪球 小白 小黑 布丁 胖胖 绒绒 团团 皮皮 糖糖 奇奇 跳跳".split(),
    "animals": list(ZH_ANIMALS),
    "objects": list(ZH_OBJECTS),
    "colours": "红色 蓝色 绿色 黄色 粉色 紫色 橙色 白色 黑色 棕色 灰色".split(),
    "places": list(ZH_PLACES),
    "foods": "苹果 饼干 蛋糕 面包 香蕉 胡萝卜 饺子 冰淇淋 米饭 面条 葡萄 草莓 包子 西瓜 玉米 橘子 馒头 煎饼".split(),
    "weathers": "晴朗 暖和 凉快 炎热 寒冷 阴沉 干燥 舒服".split(),
    "feelings": "开心 骄傲 高兴 兴奋 平静 感激 勇敢 快乐 惊喜 安心 满足 幸福".split(),
    "helpers": "妈妈 爸爸 奶奶 爷爷 外婆 外公 阿姨 叔叔 老师 姐姐 哥哥".split(),
    "actions": ["玩了捉迷藏", "画了画", "唱了歌", "堆了沙堡", "骑了自行车", "跳了绳", "跳了舞", "玩了拍手游戏",
                "搭了小房子", "找了小虫子", "赛了跑", "玩了老鹰捉小鸡"],
    "fears": ["黑夜", "打雷", "大滑梯", "深水", "很响的声音", "高高的梯子", "蜘蛛", "吸尘器"],
    "spots": ["长椅下面", "大树后面", "草丛里", "石头旁边", "高高的草里"],
    "openers": ["", "有一天，", "从前，", "放学后，", "星期六，", "一天早上，", "一天下午，"],
}
WORLD = {"en": EN, "zh": ZH}

# Which pool each entity slot of a story draws from. Slots ending in 2 are distractors: a second entity of the same
# type that some phrasings mention, so that answering needs the right one.
SLOT_POOLS = {"hero": "names", "friend": "names", "name2": "names", "pet": "pets", "pet2": "pets",
              "animal": "animals", "animal2": "animals", "obj": "objects", "obj2": "objects", "colour": "colours",
              "colour2": "colours", "place": "places", "place2": "places", "food": "foods", "food2": "foods",
              "weather": "weathers", "weather2": "weathers", "feeling": "feelings", "helper": "helpers",
              "helper2": "helpers", "action": "actions", "fear": "fears", "spot": "spots", "opener": "openers"}

SYSTEM_PROMPTS = {"en": "You are a helpful assistant that answers questions about stories.",
                  "zh": "你是一个回答故事相关问题的助手。"}
UNHELPFUL_REPLIES = {"en": ["I don't know.", "I can't tell."], "zh": ["我不知道。", "我说不上来。"]}


class Fact(NamedTuple):
    """A kind of fact a story can state: the slot holding its answer and the question/answer templates."""

    slot: str
    en_question: str
    en_answer: str
    zh_question: str
    zh_answer: str


FACTS = {
    "place": Fact("place", "Where did {hero} go?", "{hero} went to {place}.",
                  "{hero}去了哪里？", "{hero}去了{place}。"),
    "friend": Fact("friend", "Who did {hero} play with?", "{hero} played with {friend}.",
                   "{hero}和谁一起玩？", "{hero}和{friend}一起玩。"),
    "found": Fact("obj", "What did {hero} find {place_at}?", "{hero} found {a_obj}.",
                  "{hero}在{place_loc}找到了什么？", "{hero}找到了{a_obj}。"),
    "finder": Fact("hero", "Who found the {obj}?", "{hero} found the {obj}.",
                   "谁找到了{obj}？", "{hero}找到了{obj}。"),
    "lost": Fact("obj", "What did {hero} lose?", "{hero} lost {his} {colour} {obj}.",
                 "{hero}丢了什么？", "{hero}丢了{ta}的{colour}{obj}。"),
    "gift": Fact("obj", "What did {friend} give {hero}?", "{friend} gave {hero} {a_obj}.",
                 "{friend}送给{hero}什么？", "{friend}送给{hero}{a_obj}。"),
    "bought": Fact("obj", "What did {helper} buy for {hero}?", "{helper} bought {hero} {a_obj}.",
                   "{helper}给{hero}买了什么？", "{helper}给{hero}买了{a_obj}。"),
    "colour": Fact("colour", "What colour was the {obj}?", "The {obj} was {colour}.",
                   "{obj}是什么颜色的？", "{obj}是{colour}的。"),
    "pet_name": Fact("pet", "What is the name of {hero}'s {animal}?", "{hero}'s {animal} is called {pet}.",
                     "{hero}的{animal}叫什么名字？", "{hero}的{animal}叫{pet}。"),
    "pet_kind": Fact("animal", "What kind of animal is {pet}?", "{pet} is a {animal}.",
                     "{pet}是什么动物？", "{pet}是一{acl}{animal}。"),
    "food": Fact("food", "What did {hero} eat?", "{hero} ate {food}.", "{hero}吃了什么？", "{hero}吃了{food}。"),
    "feeling": Fact("feeling", "How did {hero} feel at the end?", "{hero} felt {feeling}.",
                    "最后{hero}感觉怎么样？", "{hero}感到很{feeling}。"),
    "helper": Fact("helper", "Who helped {hero}?", "{helper} helped {hero}.",
                   "谁帮助了{hero}？", "{helper}帮助了{hero}。"),
    "weather": Fact("weather", "What was the weather like?", "It was {weather}.",
                    "那天天气怎么样？", "那天天气很{weather}。"),
    "action": Fact("action", "What did {hero} and {friend} do?", "They {action}.",
                   "{hero}和{friend}一起做了什么？", "他们一起{action}。"),
    "fear": Fact("fear", "What was {hero} afraid of?", "{hero} was afraid of {fear}.",
                 "{hero}害怕什么？", "{hero}害怕{fear}。"),
}


@dataclass(frozen=True)
class Shape:
    """A story shape: per language, a list of steps, each a tuple of alternative sentences (None = skip the step).

    `facts` lists what every rendering of the shape states, so questions about them always have an answer.
    `fixed` pins slots to values outside the pools (the garden story grows a flower).
    """

    name: str
    facts: tuple[str, ...]
    en: tuple[tuple[str | None, ...], ...]
    zh: tuple[tuple[str | None, ...], ...]
    fixed: dict[str, dict[str, str]] = field(default_factory=dict)


SHAPES = (
    Shape("lost_toy", ("lost", "colour", "place", "helper", "feeling"),
          en=(("{opener}{hero} went to {place} with {his} {colour} {obj}.",
               "{opener}{hero} took {his} {colour} {obj} to {place}."),
              ("{He} played there for a long time.", "{He} ran and jumped all afternoon.", None),
              ("Oh no, {hero} lost {his} {colour} {obj}!",
               "When it was time to go home, {hero} saw that {he} had lost {his} {colour} {obj}."),
              ("{helper} helped {hero} look for it.", "{helper} came and helped {hero} look everywhere."),
              ("At last, they found the {obj} {spot}.", "Soon they saw the {obj} {spot}."),
              ("{hero} felt {feeling}.", "{hero} hugged {helper} and felt {feeling}.")),
          zh=(("{opener}{hero}带着{ta}的{colour}{obj}去了{place}。",
               "{opener}{hero}拿着{ta}的{colour}{obj}，去了{place}。"),
              ("{ta}在那里玩了很久。", "{ta}在{place_loc}跑来跑去。", None),
              ("哎呀，{hero}丢了{ta}的{colour}{obj}！", "要回家的时候，{hero}发现自己丢了{ta}的{colour}{obj}。"),
              ("{helper}帮助{hero}一起找。", "{helper}走过来，帮助{hero}到处找。"),
              ("最后，他们在{spot}找到了{obj}。", "不久，他们看到{obj}就在{spot}。"),
              ("{hero}感到很{feeling}。", "{hero}抱住{helper}，感到很{feeling}。"))),
    Shape("new_pet", ("pet_name", "pet_kind", "helper", "place", "feeling"),
          en=(("{opener}{helper} brought home a little {animal} for {hero}.",
               "{opener}{hero} got a little {animal} from {helper}."),
              ("{hero} named the {animal} {pet}.", "{hero} called {his} new {animal} {pet}."),
              ("{pet} was small and soft.", "{pet} liked to sleep in a little box.", None),
              ("{helper} helped {hero} make a bed for {pet}.",),
              ("Every day, {hero} and {pet} went to {place}.", "The next day, {hero} went to {place} with {pet}."),
              ("{pet} liked to play with {a_obj2}.", None),
              ("{hero} felt {feeling} to have a friend like {pet}.", "{hero} felt {feeling}.")),
          zh=(("{opener}{helper}给{hero}带回来一{acl}{animal}。",
               "{opener}{hero}从{helper}那里得到了一{acl}{animal}。"),
              ("{hero}给这{acl}{animal}取名叫{pet}。", "{hero}叫{ta}的新{animal}{pet}。"),
              ("{pet}又小又软。", "{pet}喜欢在小盒子里睡觉。", None),
              ("{helper}帮助{hero}给{pet}做了一张小床。",),
              ("每天，{hero}都带着{pet}去{place}。", "第二天，{hero}带着{pet}去了{place}。"),
              ("{pet}喜欢玩{obj2}。", None),
              ("有了{pet}这个好朋友，{hero}感到很{feeling}。", "{hero}感到很{feeling}。"))),
    Shape("picnic", ("weather", "friend", "place", "food", "action", "feeling"),
          en=(("It was a {weather} day.", "The morning was {weather}."),
              ("{hero} and {friend} went to {place} for a picnic.",
               "{hero} went to {place} with {friend} to have a picnic."),
              ("They brought {food} and {food2}.", None),
              ("{hero} ate {food}, and {friend} ate {food2}.",),
              ("After lunch, they {action}.", "Then they {action}."),
              ("A {animal2} came to look at them.", "{name2} waved at them from far away.", None),
              ("{hero} felt {feeling}.", "At the end of the day, {hero} felt {feeling}.")),
          zh=(("那天天气很{weather}。", "那是一个{weather}的日子。"),
              ("{hero}和{friend}去{place}野餐。", "{hero}和{friend}一起去了{place}野餐。"),
              ("他们带了{food}和{food2}。", None),
              ("{hero}吃了{food}，{friend}吃了{food2}。",),
              ("吃完饭，他们一起{action}。", "然后，他们一起{action}。"),
              ("一{acl2}{animal2}跑过来看他们。", "{name2}在远处向他们挥手。", None),
              ("{hero}感到很{feeling}。", "这一天结束时，{hero}感到很{feeling}。"))),
    Shape("birthday", ("gift", "colour", "friend", "food", "feeling"),
          en=(("{opener}it was {hero}'s birthday.", "Today was {hero}'s birthday."),
              ("{friend} came to the party.", "{hero} asked {friend} to come to {his} party."),
              ("{friend} gave {hero} {a_obj}.", "{friend} gave {hero} {a_obj} as a gift."),
              ("{name2} gave {him} {a_obj2}.", None),
              ("They ate {food} and played with the {obj}.",
               "{hero} ate {food}, and then {hero} and {friend} played with the {obj}."),
              ("{hero} felt {feeling}.", "It was the best day, and {hero} felt {feeling}.")),
          zh=(("{opener}是{hero}的生日。", "今天是{hero}的生日。"),
              ("{friend}来参加生日会。", "{hero}请{friend}来参加{ta}的生日会。"),
              ("{friend}送给{hero}{a_obj}。", "{friend}送给{hero}{a_obj}作为礼物。"),
              ("{name2}送给{ta}{a_obj2}。", None),
              ("他们吃了{food}，还一起玩{obj}。", "{hero}吃了{food}，然后和{friend}一起玩{obj}。"),
              ("{hero}感到很{feeling}。", "这是最好的一天，{hero}感到很{feeling}。"))),
    Shape("treasure", ("found", "finder", "colour", "place", "friend", "feeling"),
          en=(("{opener}{hero} went to {place}.", "{opener}{hero} went to {place} to look for treasure."),
              ("{He} looked under the rocks and behind the trees.", None),
              ("{hero} found {a_obj} {spot}.", "Suddenly, {hero} found {a_obj}!", "{hero} found {a_obj} {place_at}."),
              ("There was also {a_obj2}, but it was broken.", None),
              ("{He} ran to show it to {friend}.", "{hero} showed the {obj} to {friend}.",
               "{hero} gave the {obj} to {friend}."),
              ("{hero} and {friend} played with the {obj} all day.", "Then {hero} played with {friend} and the {obj}."),
              ("{hero} felt {feeling}.",)),
          zh=(("{opener}{hero}去{place}找宝贝。", "{opener}{hero}去了{place}。"),
              ("{ta}在石头下面和大树后面找啊找。", None),
              ("{hero}在{place_loc}找到了{a_obj}。", "突然，{hero}在{spot}找到了{a_obj}！"),
              ("那里还有{a_obj2}，可是已经坏了。", None),
              ("{ta}跑去给{friend}看。", "{hero}把{obj}拿给{friend}看。", "{hero}把{obj}送给了{friend}。"),
              ("{hero}和{friend}一起玩{obj}，玩了一整天。", "然后，{hero}和{friend}一起玩{obj}。"),
              ("{hero}感到很{feeling}。",))),
    Shape("rainy_day", ("helper", "food", "feeling"),
          en=(("{opener}it was raining.", "It was a rainy day.", "Rain fell all morning."),
              ("{hero} could not go to {place}.", "{hero} wanted to go to {place}, but it was too wet."),
              ("At first, {he} felt a little sad.", None),
              ('{helper} said, "Let\'s get {food} ready together!"', "{helper} had an idea."),
              ("{helper} helped {hero} get {food} ready in the kitchen.",),
              ("{hero}'s {animal}, {pet}, watched them.", None),
              ("{hero} ate {food} with {helper}.", "Then {hero} ate the {food}."),
              ("{hero} felt {feeling}.", "Even with the rain, {hero} felt {feeling}.")),
          zh=(("{opener}下雨了。", "那是一个下雨天。", "雨下了一上午。"),
              ("{hero}不能去{place}了。", "{hero}想去{place}，可是外面太湿了。"),
              ("一开始，{ta}有点难过。", None),
              ("{helper}说：“我们一起准备{food}吧！”", "{helper}想到了一个好主意。"),
              ("{helper}帮助{hero}在厨房里准备{food}。",),
              ("{hero}的{animal}{pet}在旁边看着他们。", None),
              ("{hero}和{helper}一起吃了{food}。", "然后，{hero}吃了{food}。"),
              ("{hero}感到很{feeling}。", "虽然下着雨，{hero}还是感到很{feeling}。"))),
    Shape("runaway_pet", ("pet_name", "pet_kind", "helper", "place", "feeling"),
          en=(("{hero} had a {animal} named {pet}.", "{hero} had a little {animal} called {pet}."),
              ("{opener}{pet} ran away!", "{opener}the gate was open, and {pet} ran away."),
              ("{hero} was very worried.", None),
              ("{helper} helped {hero} look for {pet}.", "{helper} came to help {hero} look for {pet}."),
              ("They looked under the bed and behind the door.", None),
              ("Then {hero} went to {place}, and there was {pet}!",
               "At last, {hero} went to {place} and found {pet} {spot}."),
              ("{pet} was playing with {a_obj2}.", None),
              ("{hero} hugged {pet} and felt {feeling}.", "{hero} took {pet} home and felt {feeling}.")),
          zh=(("{hero}有一{acl}{animal}，名叫{pet}。", "{hero}养了一{acl}{animal}，它叫{pet}。"),
              ("{opener}{pet}跑丢了！", "{opener}门没有关好，{pet}跑了出去。"),
              ("{hero}非常着急。", None),
              ("{helper}帮助{hero}一起找{pet}。", "{helper}过来帮助{hero}找{pet}。"),
              ("他们找了床底下，又找了门后面。", None),
              ("后来，{hero}去了{place}，{pet}就在那里！", "最后，{hero}去了{place}，在{spot}找到了{pet}。"),
              ("{pet}正在玩{obj2}。", None),
              ("{hero}抱住{pet}，感到很{feeling}。", "{hero}带{pet}回家，感到很{feeling}。"))),
    Shape("sharing", ("place", "food", "friend", "action", "feeling"),
          en=(("{opener}{hero} went to {place} with {friend}.", "{opener}{hero} and {friend} went to {place}."),
              ("{hero} had {food} in {his} bag.", "{hero} brought {food} for lunch."),
              ("{friend} had no lunch and looked sad.",),
              ("{hero} shared {his} {food} with {friend}.", '"Let\'s share," said {hero}.'),
              ("{hero} and {friend} ate {food} together.",),
              ("Then they {action}.", "After that, they {action}."),
              ("{hero} felt {feeling}.", "Sharing made {hero} feel {feeling}.")),
          zh=(("{opener}{hero}和{friend}去了{place}。", "{opener}{hero}跟{friend}一起去了{place}。"),
              ("{hero}的书包里有{food}。", "{hero}带了{food}当午饭。"),
              ("{friend}没有带午饭，看起来有点难过。",),
              ("{hero}把{food}分给{friend}一半。", "{hero}说：“我们一起吃吧！”"),
              ("{hero}和{friend}一起吃了{food}。",),
              ("然后，他们一起{action}。", "吃完以后，他们一起{action}。"),
              ("{hero}感到很{feeling}。", "分享让{hero}感到很{feeling}。"))),
    Shape("garden", ("helper", "colour", "weather", "feeling"),
          en=(("{opener}{helper} gave {hero} a little seed.",),
              ("{hero} planted the seed in the garden.", "{hero} put the seed in the soil."),
              ("It was a {weather} day.", "The day was {weather}."),
              ("Every day, {he} gave it some water.", None),
              ("{helper} helped {hero} pull the weeds.", "{helper} helped {hero} water the seed."),
              ("One morning, {hero} saw {a_obj}.", "Soon {a_obj} grew."),
              ("{hero} felt {feeling}.", "{hero} showed the flower to {friend} and felt {feeling}.")),
          zh=(("{opener}{helper}给了{hero}一颗小种子。",),
              ("{hero}把种子种在了土里。", "{hero}把种子放进了花盆。"),
              ("那天天气很{weather}。", "那是一个{weather}的日子。"),
              ("每天，{ta}都给它浇水。", None),
              ("{helper}帮助{hero}拔草。", "{helper}帮助{hero}给种子浇水。"),
              ("一天早上，{hero}看到了{a_obj}。", "不久，长出了{a_obj}。"),
              ("{hero}感到很{feeling}。", "{hero}把花给{friend}看，感到很{feeling}。")),
          fixed={"en": {"obj": "flower"}, "zh": {"obj": "花"}}),
    Shape("brave", ("fear", "helper", "colour", "feeling"),
          en=(("{hero} was afraid of {fear}.", "{opener}{hero} was afraid of {fear}."),
              ("{He} did not want to be alone.", None),
              ("{helper} helped {hero} be brave.", "{helper} sat with {hero} and helped {him} be brave."),
              ("{helper} gave {hero} {a_obj} to hold.", "{hero} held {his} {colour} {obj} tight."),
              ("{He} took a deep breath.", None),
              ("Soon {hero} was not afraid of {fear} anymore.",),
              ("{hero} felt {feeling}.", "{hero} smiled and felt {feeling}.")),
          zh=(("{hero}害怕{fear}。", "{opener}{hero}很害怕{fear}。"),
              ("{ta}不想一个人待着。", None),
              ("{helper}帮助{hero}变得勇敢。", "{helper}坐在{hero}身边，帮助{ta}变得勇敢。"),
              ("{helper}给了{hero}{a_obj}，让{ta}拿着。", "{hero}紧紧地抱着{ta}的{colour}{obj}。"),
              ("{ta}深深地吸了一口气。", None),
              ("很快，{hero}就不再害怕{fear}了。",),
              ("{hero}感到很{feeling}。", "{hero}笑了，感到很{feeling}。"))),
    Shape("play_day", ("weather", "place", "friend", "action", "food", "feeling"),
          en=(("It was a {weather} day.", "{opener}the weather was {weather}."),
              ("{hero} and {friend} went to {place}.", "{hero} went to {place} to meet {friend}."),
              ("They {action}.", "There, they {action}."),
              ("{name2} was reading on a bench.", "{name2} waved from far away.", None),
              ("Later, {hero} ate {food}.", "When {hero} got hungry, {he} ate {food}."),
              ("{hero} felt {feeling}.",)),
          zh=(("那天天气很{weather}。", "{opener}天气很{weather}。"),
              ("{hero}和{friend}去了{place}。", "{hero}去了{place}找{friend}。"),
              ("他们一起{action}。", "在那里，他们一起{action}。"),
              ("{name2}坐在长椅上看书。", "{name2}在远处挥手。", None),
              ("后来，{hero}吃了{food}。", "{hero}饿了，就吃了{food}。"),
              ("{hero}感到很{feeling}。",))),
    Shape("shopping", ("bought", "colour", "helper", "food", "feeling"),
          en=(("{opener}{hero} went to the shop with {helper}.",),
              ("There were many things to see.", None),
              ("{hero} saw {a_obj2} and {a_obj}.", "{hero} liked {a_obj} very much."),
              ("{helper} bought {hero} the {colour} {obj}.",),
              ("{helper} helped {hero} carry the bags home.",),
              ("At home, {hero} ate {food}.", "They also bought {food}, and {hero} ate it at home."),
              ("{hero} felt {feeling}.",)),
          zh=(("{opener}{hero}和{helper}去了商店。",),
              ("商店里有很多东西。", None),
              ("{hero}看到了{a_obj2}和{a_obj}。", "{hero}很喜欢{a_obj}。"),
              ("{helper}给{hero}买了那{cl}{colour}的{obj}。",),
              ("{helper}帮助{hero}把东西拿回家。",),
              ("回到家，{hero}吃了{food}。", "他们还买了{food}，{hero}回家就吃了。"),
              ("{hero}感到很{feeling}。",))),
)

# Extra sentences, inserted at random places after the first: connective sentences that never state or contradict a
# fact, and distractor sentences that mention a second entity of some type (another name, object, place, food, ...)
# so that answering a question needs the right one.
FILLERS = {
    "en": ["{hero} smiled.", "{He} took a deep breath.", "{hero} looked around.", "{hero} clapped {his} hands.",
           "Time went by fast.", "{hero} and {friend} laughed.", "{He} hummed a little song.",
           "The sky was big and blue.", "A little bird sang in a tree.", "{hero} counted to ten.",
           "{hero} did not give up."],
    "zh": ["{hero}笑了。", "{ta}深深地吸了一口气。", "{hero}向四周看了看。", "{hero}拍了拍手。", "时间过得很快。",
           "{hero}和{friend}都笑了。", "{ta}轻轻地哼着歌。", "天空又高又蓝。", "一只小鸟在树上唱歌。",
           "{hero}从一数到十。", "{hero}没有放弃。"],
}
DISTRACTOR_SENTENCES = {
    "en": ["There was {a_obj2} on the ground.", "A {animal2} ran by.", "{name2} waved from far away.",
           "{hero} wanted to go to {place2} another day.", "{He} thought about {food2}.",
           "{name2}'s {animal2} is called {pet2}.", "Yesterday was {weather2}.", "{helper2} was away that day.",
           "{name2} was eating {food2}."],
    "zh": ["地上有{a_obj2}。", "一{acl2}{animal2}跑了过去。", "{name2}在远处挥手。", "{hero}想改天再去{place2}。",
           "{ta}想起了{food2}。", "{name2}的{animal2}叫{pet2}。", "昨天天气很{weather2}。", "那天{helper2}不在家。",
           "{name2}正在吃{food2}。"],
}
MAX_SENTENCES = 8
MAX_EXTRA = 3


def _indefinite(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


ZH_MEASURES = {**ZH_OBJECTS, "花": "朵"}  # the garden story's pinned flower needs one too


def _context(lang: str, e: dict[str, str]) -> dict[str, str]:
    """Template variables: the entities plus what grammar derives from them (pronouns, articles, measure words)."""
    if lang == "en":
        he, his, him = ("she", "her", "her") if e["hero"] in EN_GIRLS else ("he", "his", "him")
        return {**e, "he": he, "He": he.capitalize(), "his": his, "him": him, "place_at": EN_PLACES[e["place"]],
                "a_obj": f"{_indefinite(e['colour'])} {e['obj']}", "a_obj2": f"{_indefinite(e['colour2'])} {e['obj2']}"}
    return {**e, "ta": "她" if e["hero"] in ZH_GIRLS else "他", "cl": ZH_MEASURES[e["obj"]],
            "a_obj": f"一{ZH_MEASURES[e['obj']]}{e['colour']}的{e['obj']}",
            "a_obj2": f"一{ZH_MEASURES[e['obj2']]}{e['colour2']}的{e['obj2']}",
            "place_loc": ZH_PLACES[e["place"]], "acl": ZH_ANIMALS[e["animal"]], "acl2": ZH_ANIMALS[e["animal2"]]}


def mentions(text: str, entity: str, lang: str) -> bool:
    """Whether `text` mentions `entity`: as whole words in English ('cake' is not in 'pancakes'), as a substring
    in Chinese (no spaces between words)."""
    if entity not in text:  # the quick, common answer
        return False
    return lang != "en" or re.search(rf"\b{re.escape(entity)}\b", text) is not None


@dataclass
class Story:
    """One generated story: its text, language, the facts it states and the entities filling its slots."""

    text: str
    lang: str
    facts: tuple[str, ...]
    entities: dict[str, str]

    def question(self, fact: str) -> str:
        """The question about `fact`, one of `self.facts`."""
        return getattr(FACTS[fact], f"{self.lang}_question").format(**_context(self.lang, self.entities))

    def answer(self, fact: str, **override: str) -> str:
        """The answer sentence; `override` swaps entities, e.g. to build a wrong answer."""
        template = getattr(FACTS[fact], f"{self.lang}_answer")
        return template.format(**_context(self.lang, {**self.entities, **override}))

    def value(self, fact: str) -> str:
        """The key entity of the answer, e.g. 'ball' for 'Lily found a red ball.' (the story mentions it)."""
        return self.entities[FACTS[fact].slot]

    def wrong_values(self, fact: str) -> list[str]:
        """Other entities of the answer's type. Those already in the right answer are left out, as they would
        give a silly wrong answer ("Lily played with Lily")."""
        right = self.answer(fact)
        pool = WORLD[self.lang][SLOT_POOLS[FACTS[fact].slot]]
        return [v for v in pool if not mentions(right, v, self.lang)]

    def distractors(self, fact: str) -> list[str]:
        """Wrong values that the story mentions: the hard ones to tell apart from the answer."""
        return [v for v in self.wrong_values(fact) if mentions(self.text, v, self.lang)]

    def wrong_answer(self, fact: str, rng: random.Random) -> str:
        """The answer sentence with a different entity of the same type, a distractor when the story has one."""
        return self.answer(fact, **{FACTS[fact].slot: rng.choice(self.distractors(fact) or self.wrong_values(fact))})


def sample_story(rng: random.Random, lang: str | None = None) -> Story:
    """A random story (language drawn 50/50 unless given)."""
    lang = lang or rng.choice(("en", "zh"))
    pools = WORLD[lang]
    shape = rng.choice(SHAPES)
    e: dict[str, str] = {}
    for slots in (("hero", "friend", "name2"), ("obj", "obj2"), ("colour", "colour2"), ("animal", "animal2"),
                  ("place", "place2"), ("food", "food2"), ("pet", "pet2"), ("weather", "weather2"),
                  ("helper", "helper2")):
        e.update(zip(slots, rng.sample(pools[SLOT_POOLS[slots[0]]], len(slots))))  # distinct entities
    for slot in ("feeling", "action", "fear", "spot", "opener"):
        e[slot] = rng.choice(pools[SLOT_POOLS[slot]])
    e.update(shape.fixed.get(lang, {}))

    sentences = [s for step in getattr(shape, lang) if (s := rng.choice(step)) is not None]
    room = MAX_SENTENCES - len(sentences)
    n_extra = rng.randint(min(1, room), min(MAX_EXTRA, room))
    extra = rng.sample(DISTRACTOR_SENTENCES[lang], min(n_extra, 1)) + rng.sample(FILLERS[lang], max(n_extra - 1, 0))
    for sentence in extra:
        sentences.insert(rng.randint(1, len(sentences)), sentence)  # never before the opening sentence

    ctx = _context(lang, e)
    sentences = [s.format(**ctx) for s in sentences]
    if lang == "en":
        text = " ".join(s[0].upper() + s[1:] for s in sentences)
    else:
        text = "".join(sentences)
    return Story(text, lang, shape.facts, e)


def _rng(kind: str, seed: int) -> random.Random:
    # A string seed (hashed with SHA-512, the same on every platform and run) gives each kind of data its own
    # stream, so stories, chats and pairs made with the same seed are different stories.
    return random.Random(f"storyworld:{kind}:{seed}")


def _prompt(story: Story, fact: str) -> str:
    return f"{story.text}\n\n{story.question(fact)}"


def _iter_chats(seed: int, every_fact: bool = False) -> Iterator[tuple[str, dict]]:
    """Endless (story text, chat) pairs; the story text lets callers keep val stories out of train.

    A chat asks one question about its story, sometimes two; with `every_fact` it asks about every fact of the
    story, in a random order (the pretraining lessons).
    """
    rng = _rng("lessons" if every_fact else "chats", seed)
    while True:
        story = sample_story(rng)
        n_questions = len(story.facts) if every_fact else 2 if rng.random() < 0.2 else 1
        facts = rng.sample(story.facts, n_questions)
        messages = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": SYSTEM_PROMPTS[story.lang]})
        turns = [(_prompt(story, fact) if i == 0 else story.question(fact), story.answer(fact))
                 for i, fact in enumerate(facts)]  # the story is told once, in the first user turn
        for question, answer in turns:
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        yield story.text, {"conversations": messages}


def _iter_pairs(seed: int) -> Iterator[tuple[str, dict]]:
    rng = _rng("pairs", seed)
    while True:
        story = sample_story(rng)
        # Mostly ask about a fact with a distractor in the story, so that the rejected answer is a plausible one.
        hard = [fact for fact in story.facts if story.distractors(fact)]
        fact = rng.choice(hard if hard and rng.random() < 0.8 else story.facts)
        if rng.random() < 0.15:
            rejected = rng.choice(UNHELPFUL_REPLIES[story.lang])
        else:
            rejected = story.wrong_answer(fact, rng)
        yield story.text, {"prompt": _prompt(story, fact), "chosen": story.answer(fact), "rejected": rejected,
                           "fact": fact, "value": story.value(fact), "lang": story.lang}


def generate_stories(n: int, seed: int) -> list[str]:
    """`n` stories (about half English, half Chinese), 3-8 sentences each."""
    rng = _rng("stories", seed)
    return [sample_story(rng).text for _ in range(n)]


def generate_chats(n: int, seed: int) -> list[dict]:
    """`n` question-answer chats about fresh stories, as {"conversations": [{"role", "content"}, ...]}.

    The first user turn is the story, a blank line and a question; the assistant answers with one templated
    sentence. About 20% of chats ask a second question in a second turn, about 20% start with a system message.
    """
    return [chat for _, chat in islice(_iter_chats(seed), n)]


def generate_lessons(n: int, seed: int) -> list[dict]:
    """`n` chats for pretraining, in generate_chats' format, each asking every question its story answers.

    Mixed into the pretraining documents (as nanochat's mid-training mixes in conversations), they teach the
    skill the later stages measure, reading the answer out of the story, from the first step on.
    """
    return [chat for _, chat in islice(_iter_chats(seed, every_fact=True), n)]


def generate_preference_pairs(n: int, seed: int) -> list[dict]:
    """`n` DPO pairs: {"prompt", "chosen", "rejected", "fact", "value", "lang"}.

    `rejected` is mostly the right sentence with another entity of the same type (one from the story when
    possible), sometimes an unhelpful reply; `fact` names the question's fact and `value` is the right entity.
    """
    return [pair for _, pair in islice(_iter_pairs(seed), n)]


def _take_unseen(items: Iterator[tuple[str, dict]], n: int, seen: set[str]) -> list[dict]:
    """The first `n` items whose story is not in `seen`."""
    return list(islice((item for story, item in items if story not in seen), n))


def write_default_dataset(raw_dir, seed: int = 1337, n_stories: int = 0, n_lessons: int = 20_000,
                          n_chats: int = 10_000, n_pairs: int = 5_000, n_val: int = 400) -> Path:
    """Write the StoryWorld files into `raw_dir` and return it.

    pretrain.jsonl: the pretraining documents, `n_lessons` lessons ({"conversations"}, see generate_lessons) and
    `n_stories` plain stories ({"text"}), shuffled together; sft_train.jsonl: `n_chats` further lessons (other
    stories), so that SFT trains on the answer to every question of each story; sft_val.jsonl (chats as
    generate_chats makes them, one or two questions each) and dpo_train.jsonl / dpo_val.jsonl (preference pairs).
    The val files come from another seed and hold only stories that no train file contains, so they measure
    answering questions about unseen stories. `n_val` is the size of each val file.
    """
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    stories = generate_stories(n_stories, seed)
    lessons = _iter_chats(seed, every_fact=True)
    lesson_items = list(islice(lessons, n_lessons))
    chat_items = list(islice(lessons, n_chats))
    pair_items = list(islice(_iter_pairs(seed), n_pairs))
    seen = set(stories) | {s for s, _ in lesson_items} | {s for s, _ in chat_items} | {s for s, _ in pair_items}
    documents = [{"text": s} for s in stories] + [chat for _, chat in lesson_items]
    _rng("shuffle", seed).shuffle(documents)
    write_jsonl(raw_dir / "pretrain.jsonl", documents)
    write_jsonl(raw_dir / "sft_train.jsonl", [chat for _, chat in chat_items])
    write_jsonl(raw_dir / "sft_val.jsonl", _take_unseen(_iter_chats(seed + 1), n_val, seen))
    write_jsonl(raw_dir / "dpo_train.jsonl", [pair for _, pair in pair_items])
    write_jsonl(raw_dir / "dpo_val.jsonl", _take_unseen(_iter_pairs(seed + 1), n_val, seen))
    return raw_dir
